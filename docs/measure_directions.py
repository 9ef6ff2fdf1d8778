"""What each direction type costs per record on SmolLM2-135M-Instruct (fp32, `embedded:smollm2-135m`), CPU.

For dense, layerwise (0.25), sparse (random and magnitude, 0.25) and lowrank (r = 2): the median over `--repeat`
records of (a) the two perturbed forwards on a batch of 8 x 64 tokens and (b) the update, with the recipe's
`compile = "auto"` kernels. Run from the repository root:

    OMP_NUM_THREADS=1 python docs/measure_directions.py --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mezo_tune import models
from mezo_tune.directions import Directions
from mezo_tune.mezo import Mezo, trainable_set
from mezo_tune.recipe import ModelConfig
from mezo_tune.run import use_compile

def choices(v_every: int = 50) -> dict:
    """The direction choices both docs scripts compare (low-rank V kept for v_every records)."""
    return {
        "dense": Directions(),
        "layerwise 0.25": Directions("layerwise", fraction=0.25),
        "sparse random 0.25": Directions("sparse", fraction=0.25, mask="random"),
        "sparse magnitude 0.25": Directions("sparse", fraction=0.25, mask="magnitude"),
        "lowrank r=2": Directions("lowrank", rank=2, v_every=v_every),
    }


CHOICES = choices()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model, _, _ = models.load(ModelConfig(path="embedded:smollm2-135m", device="cpu"), progress=False)
    trainable = trainable_set(model)
    ids = torch.randint(0, 49152, (8, 64), generator=torch.Generator().manual_seed(0))
    print(f"{'directions':24} {'forward pair s':>15} {'update s':>9}")
    for label, directions in CHOICES.items():
        engine = Mezo(model, trainable, seed=0, eps=1e-3, use_compile=use_compile("auto", "cpu"),
                      directions=directions.resolved(len(trainable.names)))
        pair, update = [], []
        for r in range(args.repeat + 1):  # record 0 warms up (kernel build, scratch buffers)
            t0 = time.perf_counter()
            engine.loss_pair(r, lambda: model(input_ids=ids, labels=ids).loss)
            t1 = time.perf_counter()
            engine.apply_update(r, 0.0 if r == 0 else 1e-12)  # a tiny c: the cost, not a change that matters
            t2 = time.perf_counter()
            if r:
                pair.append(t1 - t0)
                update.append(t2 - t1)
        print(f"{label:24} {statistics.median(pair):15.2f} {statistics.median(update):9.2f}")


if __name__ == "__main__":
    main()
