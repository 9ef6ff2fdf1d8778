"""Do MeZO's iterates scatter around better weights? (issue #15: a candidate that lost)

Rebuilds a run from its trajectory one step at a time and scores on an eval set the average of the trainable weights
over each window a..b of steps (θ_a .. θ_b, the weights after a and after b steps). The average is again a function
of the base weights and the records alone, so a winner would be replayable; none won (README, "Where it stands").

    python docs/average_iterates.py runs/rt-zo-best/trajectory.mezo 101-900 201-401 --data data/rt/eval.jsonl

Run it where the recipe's data paths resolve. Each window costs one eval; the replay of a norm-only run is seconds.
"""
import argparse

import torch

from mezo_tune.recipe import parse_recipe
from mezo_tune.replay import rebuild
from mezo_tune.run import load_rows, make_task
from mezo_tune.trajectory import read_trajectory


def window(text: str) -> tuple[int, int]:
    a, _, b = text.partition("-")
    lo, hi = int(a), int(b or a)
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: want a-b with 0 <= a <= b")
    return lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trajectory")
    ap.add_argument("windows", nargs="+", type=window, help="a-b: average the weights after a .. b steps")
    ap.add_argument("--data", help="eval rows (default: the recipe's data.eval)")
    args = ap.parse_args()

    data = read_trajectory(args.trajectory)
    last = max(b for _, b in args.windows)
    if last > len(data.steps):
        ap.error(f"the trajectory holds {len(data.steps)} steps; a window ends at {last}")
    recipe = parse_recipe(data.header["recipe"], f"the recipe recorded in {args.trajectory}", check_files=False)
    rebuilt = rebuild(args.trajectory, steps=0, in_memory=True, progress=False)
    engine, model = rebuilt.engine, rebuilt.model
    task = make_task(recipe, rebuilt.tokenizer)
    rows = load_rows(args.data or recipe.data.eval, task)
    params = engine.trainable.params
    sums = {w: [torch.zeros_like(p, dtype=torch.float64) for p in params] for w in args.windows}
    for t in range(last + 1):  # t: the weights after t steps
        if t:
            engine.apply_record(data.steps[t - 1])
        for (a, b), acc in sums.items():
            if a <= t <= b:
                for s, p in zip(acc, params):
                    s += p.detach().double()
    model.eval()
    for (a, b), acc in sums.items():
        with torch.no_grad():
            for p, s in zip(params, acc):
                p.copy_((s / (b - a + 1)).to(p.dtype))
            result = task.evaluate(model, rows, batch_size=recipe.mezo.batch_size)
        print(f"mean of θ_{a}..θ_{b}: accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
