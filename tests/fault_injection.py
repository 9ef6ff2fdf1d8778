"""Fault injection: `mezo-tune train` killed with SIGKILL at chosen moments, each kill resumed and compared with an
uninterrupted run (issue #13). Not a test module itself: tests/test_sigkill.py runs a few kills, this script all.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/fault_injection.py --kills 20            # tiny Llama, 40 steps
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/fault_injection.py --kills 1 --smollm2  # embedded SmolLM2, 6 steps

A kill is (phase, n, fraction), drawn from a seeded generator. The killed process is `mezo-tune train` with hooks
installed (`arm`) that SIGKILL it from inside, at the n-th occurrence of its phase:
  forward     inside a module's forward, the n-th module called during a random step
  update      inside the update of a random step, after some of its tensors were updated in place
  append      during the n-th trajectory write, after a fraction of the block's bytes reached the file
  checkpoint  during the n-th checkpoint save: the tensor file cut at a fraction, or between its two renames
  export      during the final export: the safetensors file of final.tmp cut at a fraction
Then `mezo-tune train --resume` (in this process) finishes the run; its records, keyframes, evals, end block (and,
without a time-based flush, every byte after the header) and final weights must equal the uninterrupted run's.
Steps lost = steps the killed process had finished (appended) minus the steps a resume recovers after the kill: those
intact in the file and those in the step journal that continue them (trajectory.read_for_resume).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PHASES = ("forward", "update", "append", "checkpoint", "export")
HERE = Path(__file__).resolve().parent


# ---- the killed process ---------------------------------------------------------------------------------------------

def arm(spec: dict) -> None:
    """Install the hooks that SIGKILL this process at spec's moment; before dying it writes how many steps it had
    appended to spec["report"] (fsynced), so the caller can count what the kill lost."""
    import safetensors.torch
    import torch

    from mezo_tune import mezo, models, trajectory, zrng

    phase, n, fraction = spec["phase"], spec["n"], spec["fraction"]
    state = {"appended": 0, "count": 0, "in_update": False}

    def die() -> None:
        with open(spec["report"], "w") as f:
            json.dump({"appended": state["appended"]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def cut(path: Path) -> None:
        """A write torn at `fraction` of the file's bytes, as a kill during write() leaves it."""
        size = path.stat().st_size
        os.truncate(path, int(size * fraction))

    append_step = trajectory.TrajectoryWriter.append_step

    def counting_append(self, rec):
        append_step(self, rec)
        state["appended"] = self.next_step

    trajectory.TrajectoryWriter.append_step = counting_append

    if phase == "forward":  # n = step * 1000 + k: the k-th module forward of step `step`
        step, k = divmod(n, 1000)

        def hook(module, args):
            if state["appended"] == step:
                state["count"] += 1
                if state["count"] == k:
                    die()

        torch.nn.modules.module.register_module_forward_pre_hook(hook)
    elif phase == "update":  # n = step * 1000 + k: inside record `step`'s update, before its k-th tensor
        step, k = divmod(n, 1000)
        update_now, update_perturb = mezo.Mezo._update_now, mezo.Mezo._update_perturb
        update_tensors = zrng.update_tensors
        state["updated"] = 0  # tensors of record `step` updated so far

        def now(self, s, c, *args, **kwargs):
            state["in_update"] = s == step
            try:
                update_now(self, s, c, *args, **kwargs)
            finally:
                state["in_update"] = False

        def tensors_then_die(items, *a, **kw):
            # one C call (a kill inside it leaves some tensors updated): up to the (k - 1)-th tensor, then die
            if state["in_update"] and state["updated"] + len(items) >= k:
                update_tensors(items[: k - 1 - state["updated"]], *a, **kw)
                die()
            state["updated"] += len(items) if state["in_update"] else 0
            return update_tensors(items, *a, **kw)

        def counted(self, name, fuse):
            # the update left pending for the next step's first perturbed forward (Mezo.apply_update), tensor by tensor
            # (a blocked LM head: block by block), where `fuse` fuses it into tensor `name`'s perturbed copy: die
            # before the k-th
            pending = self._pending is not None and self._pending.step == step and name in self._pending.names
            if pending and state["updated"] == k - 1:
                die()
            done = fuse()
            state["updated"] += 1 if pending and done else 0
            return done

        def fused_or_die(self, out, w, name, *args, **kwargs):  # the general path
            return counted(self, name, lambda: update_perturb(self, out, w, name, *args, **kwargs))

        block_former = mezo.Mezo._block_former

        def blocks_or_die(self, lib, w, name, *args):  # a blocked linear's blocks on the C kernels' hot path
            form = block_former(self, lib, w, name, *args)
            return None if form is None else lambda *a: counted(self, name, lambda: form(*a))

        form_list = mezo.Mezo._form_list

        def list_or_die(self, lib, items, *args):
            # the same for several tensors in one C call (a kill inside it leaves the first ones updated): the items
            # before the k-th pending tensor, then die
            names = self._pending.names if self._pending is not None and self._pending.step == step else set()
            pending = [i for i, (_, _, name) in enumerate(items) if name in names]
            if pending and state["updated"] + len(pending) >= k:
                form_list(self, lib, items[: pending[k - 1 - state["updated"]]], *args)
                die()
            before = set(names)
            rest = form_list(self, lib, items, *args)
            after = self._pending.names if self._pending is not None else set()
            state["updated"] += len(before - after)
            return rest

        mezo.Mezo._update_now, zrng.update_tensors = now, tensors_then_die
        mezo.Mezo._update_perturb, mezo.Mezo._block_former = fused_or_die, blocks_or_die
        mezo.Mezo._form_list = list_or_die  # (lib, [(out, w, name), ...], ...)
    elif phase == "append":  # the n-th write of a block (the header is write 0)
        write_chunk = trajectory.TrajectoryWriter._write_chunk

        def writing(self, data):
            state["count"] += 1
            if state["count"] == n + 1:
                os.write(self._fd, bytes(data[: int(len(data) * fraction)]))
                die()
            return write_chunk(self, data)

        trajectory.TrajectoryWriter._write_chunk = writing
    elif phase == "checkpoint":  # the n-th checkpoint: its tensors cut (fraction < 0.5) or between its renames
        save_file, rename = safetensors.torch.save_file, Path.rename

        def saving(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            if Path(filename).parent.name == "checkpoint.tmp":
                state["count"] += 1
                if state["count"] == n and fraction < 0.5:
                    cut(Path(filename))
                    die()

        def renaming(self, target):
            result = rename(self, target)
            if state["count"] == n and fraction >= 0.5 and Path(target).name == "checkpoint.old":
                die()  # the previous checkpoint moved aside, the new one not yet in place
            return result

        safetensors.torch.save_file, Path.rename = saving, renaming
    elif phase == "export":
        save_model = models.save_model

        def exporting(model, tokenizer, out_dir, state=None):
            save_model(model, tokenizer, out_dir, state)
            cut(Path(out_dir) / "model.safetensors")
            die()

        models.save_model = exporting
    else:
        raise ValueError(f"unknown phase {phase!r}: choose one of {', '.join(PHASES)}")


def child_main(spec_json: str, argv: list[str]) -> None:
    arm(json.loads(spec_json))
    from mezo_tune.cli import main

    main(argv, prog_name="mezo-tune")


# ---- the runs -------------------------------------------------------------------------------------------------------

@dataclass
class Kill:
    phase: str
    n: int
    fraction: float

    def where(self) -> str:
        if self.phase in ("forward", "update"):
            step, k = divmod(self.n, 1000)
            return f"step {step}, {'module forward' if self.phase == 'forward' else 'tensor'} {k}"
        if self.phase == "append":
            return f"block write {self.n}, {self.fraction:.0%} written"
        if self.phase == "checkpoint":
            return f"checkpoint {self.n}, " + ("tensors cut at " + f"{self.fraction:.0%}" if self.fraction < 0.5
                                               else "between its renames")
        return f"final/model.safetensors cut at {self.fraction:.0%}"


def draw_kills(count: int, seed: int, steps: int, checkpoints: int, blocks: int, tensors: int) -> list[Kill]:
    """`count` kills, the phases in turn (so every phase is hit once count >= 5), the moments drawn at random."""
    rng = random.Random(seed)
    kills = []
    for i in range(count):
        phase = PHASES[i % len(PHASES)]
        fraction = round(rng.uniform(0.05, 0.95), 2)
        if phase == "forward":
            n = rng.randrange(steps) * 1000 + rng.randint(1, 30)
        elif phase == "update":
            n = rng.randrange(steps) * 1000 + rng.randint(1, tensors)
        elif phase == "append":
            n = rng.randint(1, blocks)
        elif phase == "checkpoint":  # between the renames needs a previous checkpoint to move aside
            n = rng.randint(1 if fraction < 0.5 else 2, checkpoints)
        else:
            n = 1
        kills.append(Kill(phase, n, fraction))
    return kills


def run_killed(recipe: Path, kill: Kill, report: Path, timeout: float = 900) -> int:
    """`mezo-tune train RECIPE -q` with the kill armed; returns the steps it had appended when it died."""
    spec = json.dumps({"phase": kill.phase, "n": kill.n, "fraction": kill.fraction, "report": str(report)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec, "train", str(recipe), "-q"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"{kill}: the run was not killed (exit {proc.returncode}); the moment never came? "
                           f"{proc.stderr.decode()[-2000:]}")
    return json.loads(report.read_text())["appended"]


def outcome(out: Path) -> dict:
    """What must match between a resumed and an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from mezo_tune.trajectory import read_trajectory

    data = read_trajectory(out / "trajectory.mezo")
    weights = load_file(out / "final" / "model.safetensors")
    return {
        "records": [(r.step, r.g, r.eta, r.loss_plus, r.loss_minus, r.skipped) for r in data.steps],
        "keyframes": data.keyframes, "evals": data.evals, "end": data.end, "problem": data.problem,
        "weights": {k: (str(v.dtype), tuple(v.shape), v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                    for k, v in weights.items()},
        "blocks": (out / "trajectory.mezo").read_bytes()[data.header_bytes:],
    }


def inject(kill: Kill, recipe_for, ref: dict, work: Path) -> dict:
    """One kill in a fresh run directory, its resume, and the comparison. recipe_for(out_dir) writes the recipe."""
    from mezo_tune.recipe import load_recipe
    from mezo_tune.train import train
    from mezo_tune.trajectory import read_for_resume

    out = work / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = recipe_for(work / "recipe.toml", out)
    t0 = time.perf_counter()
    appended = run_killed(recipe, kill, work / "kill.json")
    data = read_for_resume(out / "trajectory.mezo")
    finished = data.end is not None
    lost = 0 if finished else appended - len(data.steps)
    train(load_recipe(recipe), resume=True, progress=False, log=lambda m: None)
    got = outcome(out)
    same = {k: got[k] == ref[k] for k in ref}
    same["journal removed"] = not (out / "trajectory.mezo.journal").exists()
    return {"kill": kill, "appended": appended, "intact": len(data.steps) - data.from_journal,
            "journal": data.from_journal, "lost": lost, "torn_tail": data.problem is not None, "same": same,
            "seconds": time.perf_counter() - t0}


def reference(recipe_for, root: Path) -> dict:
    """The uninterrupted run's outcome."""
    from mezo_tune.recipe import load_recipe
    from mezo_tune.train import train

    ref_dir = root / "ref"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir()
    train(load_recipe(recipe_for(ref_dir / "recipe.toml", ref_dir / "run")), progress=False, log=lambda m: None)
    return outcome(ref_dir / "run")


def tiny_setup(root: Path, steps: int = 40):
    """The tiny Llama of conftest.py and a recipe factory: lm task, keyframes every 10, checkpoints every 15, the C
    kernels (each step's update left pending for the next step's first perturbed forward, Mezo.apply_update)."""
    sys.path.insert(0, str(HERE))
    import torch
    from conftest import CORPUS, save_tiny, write_jsonl
    from test_train import write_recipe

    model = root / "model"
    if not model.exists():
        save_tiny(model, "llama", torch.float32)
    rows = [{"text": t} for t in CORPUS]
    train_rows = write_jsonl(root / "train.jsonl", rows * 2)

    def recipe_for(path: Path, out: Path) -> Path:
        return write_recipe(path, model, train_rows, out=out, steps=steps, keyframe_every=10, checkpoint_every=15,
                            max_length=24, compile="on")  # C kernels: updates fused into the next forward

    return recipe_for, dict(steps=steps, checkpoints=steps // 15, blocks=8, tensors=20)


def smollm2_setup(root: Path, steps: int = 6):
    """The embedded SmolLM2-135M (fp32), lm task on six short rows, batch 2 × 32 tokens: a few steps only."""
    sys.path.insert(0, str(HERE))
    from conftest import CORPUS, write_jsonl
    from test_train import write_recipe

    rows = [{"text": t} for t in CORPUS]
    train_rows = write_jsonl(root / "train.jsonl", rows)

    def recipe_for(path: Path, out: Path) -> Path:
        return write_recipe(path, "embedded:smollm2-135m", train_rows, out=out, steps=steps, keyframe_every=2,
                            checkpoint_every=3, max_length=32)

    return recipe_for, dict(steps=steps, checkpoints=steps // 3, blocks=4, tensors=272)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="SIGKILL mezo-tune train at random moments; resume; compare.")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--smollm2", action="store_true", help="the embedded SmolLM2-135M instead of the tiny Llama")
    ap.add_argument("--phase", choices=PHASES, help="only kills of this phase")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mezo-fault-injection"))
    args = ap.parse_args(argv)

    root = args.work / ("smollm2" if args.smollm2 else "tiny")
    root.mkdir(parents=True, exist_ok=True)
    recipe_for, sizes = smollm2_setup(root) if args.smollm2 else tiny_setup(root)
    t0 = time.perf_counter()
    ref = reference(recipe_for, root)
    print(f"uninterrupted run: {len(ref['records'])} steps, {time.perf_counter() - t0:.1f} s")
    kills = draw_kills(args.kills, args.seed, **sizes)
    if args.phase:
        kills = [k for k in draw_kills(args.kills * len(PHASES), args.seed, **sizes) if k.phase == args.phase]
        kills = kills[: args.kills]
    print(f"| # | phase | moment | steps done | in the file | in the journal | lost | resumed = uninterrupted | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for i, kill in enumerate(kills, 1):
        r = inject(kill, recipe_for, ref, root / f"kill{i}")
        results.append(r)
        differs = [k for k, ok in r["same"].items() if not ok]
        print(f"| {i} | {kill.phase} | {kill.where()} | {r['appended']} | {r['intact']}"
              f"{' (torn tail cut)' if r['torn_tail'] else ''} | {r['journal']} | {r['lost']} | "
              f"{'yes' if not differs else 'NO: ' + ', '.join(differs)} | {r['seconds']:.1f} |", flush=True)
    lost = [r["lost"] for r in results]
    bad = [r for r in results if not all(v for k, v in r["same"].items() if k != "blocks")]
    print(f"{len(results)} kills: steps lost max {max(lost)}, mean {sum(lost) / len(lost):.1f}; "
          f"{len(results) - len(bad)} resumed bit-identical (records, keyframes, evals, end, weights; journal "
          f"removed); "
          f"{sum(r['same']['blocks'] for r in results)} byte-identical after the header; "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
