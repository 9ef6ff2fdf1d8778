"""Data parallel under torchrun (DESIGN.md contract 8): which process this is, its process group, its share of a
batch, and the one all-reduce of a few float64 sums per step.

Every rank builds the same run from the same recipe and seed, so every rank draws the same z and, given the same two
losses, applies the same update: the ranks only have to agree on L+ and L-. The global batch is chosen by (seed, t)
exactly as in one process (`mezo.batch_size` rows); rank r scores the r-th contiguous slice of it and contributes
(sum of per-example losses, their count) for each sign. One all-reduce of those four float64 numbers gives every
rank Σsum / Σcount for L+ and L-, whatever the model size. A batch that does not split evenly is fine: slices differ
by one row, and the mean is over examples, not over ranks. Eval reduces its metric sums the same way.

The ring and tree all-reduces of gloo and NCCL sum each element once and send that result to every rank, so every rank
gets the same bits, computes the same g and applies the same update (contract 4): the weights stay identical without
being sent anywhere.

Without torchrun (WORLD_SIZE unset or 1) no process group is started and a run is the single-process run, bit for
bit.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

from .errors import RunError


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun launch; World() is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            with peers_answer():
                dist.barrier()


def world_from_env(environ=os.environ) -> World:
    """The World torchrun's environment describes (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    size = int(environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(environ["RANK"]), size, int(environ.get("LOCAL_RANK", environ["RANK"])),
                 int(environ.get("LOCAL_WORLD_SIZE", size)))


@contextlib.contextmanager
def process_group(device: str):
    """The World of this process, with its process group started when torchrun launched more than one (nccl when
    the run is on CUDA, gloo on CPU) and destroyed on the way out. On CUDA each process takes GPU LOCAL_RANK."""
    world = world_from_env()
    if not world.parallel:
        yield world
        return
    import torch
    import torch.distributed as dist

    from .models import resolve_device

    on_cuda = resolve_device(device).startswith("cuda")
    if on_cuda:
        if device not in ("auto", "cuda"):
            raise RunError(f"[model] device = {device!r} names one GPU, but under torchrun every process "
                                   f"takes its own (cuda:LOCAL_RANK): set device = \"cuda\" or \"auto\"")
        count = torch.cuda.device_count()
        if world.local_size > count:
            raise RunError(f"torchrun started {world.local_size} processes on this node but torch sees "
                                   f"{count} CUDA device{'s' if count != 1 else ''}: one GPU per process, so use "
                                   f"--nproc-per-node {count} or fewer")
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if on_cuda else "gloo", rank=world.rank, world_size=world.size)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def shard(rows: list, world: World) -> list:
    """Rank r's contiguous slice of rows: rows[r·n/N : (r+1)·n/N] (slices differ in length by one at most)."""
    n = len(rows)
    return rows[world.rank * n // world.size: (world.rank + 1) * n // world.size]


def all_reduce_sums(values: list[float]) -> list[float]:
    """Each value summed over every rank, in float64, in one all-reduce (on the GPU for nccl)."""
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    with peers_answer():
        dist.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def peers_answer():
    """A collective whose peers are gone (a rank killed, its node lost) or silent past the process group's timeout
    fails in torch with a backend error; say what happened and what to do instead. torchrun's own agent usually stops
    the surviving ranks first; launchers that do not (one process per node, a scheduler's srun) meet this."""

    try:
        yield
    except RuntimeError as e:  # dist.DistError and its kinds are RuntimeErrors, as are gloo's own
        first = _first_sentence(str(e)) or type(e).__name__
        raise RunError(f"another process of this launch stopped answering ({first}); the steps finished until then are "
                       f"in the trajectory and its step journal: start the same launch again with --resume"
                       ) from e


def _first_sentence(text: str) -> str:
    """'[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:8322: Connection reset by peer. This is typically
    ...' -> 'Read error [127.0.0.1]:8322: Connection reset by peer': the backend's own words, without its source
    line."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|py):\d+\]\s*", "", line)
    return line.split(". ")[0].rstrip(".")


def global_losses(plus: tuple[float, float], minus: tuple[float, float]) -> tuple[float, float]:
    """(L+, L-) of the global batch from this rank's (loss sum, count) for each sign: Mezo.loss_pair's `reduce`."""
    s_plus, n_plus, s_minus, n_minus = all_reduce_sums([*plus, *minus])
    return s_plus / n_plus, s_minus / n_minus


def eval_share(rows: list, world: World) -> tuple[list, object]:
    """(the eval rows this rank scores, the `reduce` Task.evaluate takes): every row and None in one process."""
    if not world.parallel:
        return rows, None
    return shard(rows, world), reduce_eval_sums


def reduce_eval_sums(sums: dict) -> dict:
    """A task's eval sums (numbers, or lists of numbers) summed over every rank: Task.evaluate's `reduce`.
    Integer counts come back as integers."""
    flat = [x for v in sums.values() for x in (v if isinstance(v, list) else [v])]
    total = iter(all_reduce_sums(flat))

    def back(like, value):
        return round(value) if isinstance(like, int) else value

    return {k: [back(x, next(total)) for x in v] if isinstance(v, list) else back(v, next(total))
            for k, v in sums.items()}


# ---- the number of processes, recorded in the recipe text ------------------------------------------------------------

_MARK = re.compile(r"^# data parallel: (\d+) processes", re.MULTILINE)


def mark_recipe(text: str, world: World) -> str:
    """The recipe text a run records (header and recipe.toml): with a comment naming the number of processes when
    there is more than one. The trajectory says it nowhere else (contract 8); parsing ignores it."""
    if not world.parallel:
        return text
    return (f"# data parallel: {world.size} processes (torchrun); replay is one process, resume may use any "
            f"number\n" + text)


def recorded_processes(text: str) -> int:
    """How many processes a recorded recipe text says trained the run (1 when it says nothing)."""
    m = _MARK.search(text)
    return int(m.group(1)) if m else 1
