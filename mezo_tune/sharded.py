"""Sharded weights under torchrun (`[distributed] shard_weights = true`, DESIGN.md contract 8): each process holds
1/N of every trainable tensor, for a model whose weights do not fit one device.

The model is sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer, then the root. Each
parameter becomes a DTensor placed Shard(0): rank r holds a contiguous range of dim-0 rows, which is a contiguous
range of the tensor's row-major flat indices, starting at `shard_offset`. FSDP rather than hand-written DTensor code
because FSDP already does what the forward needs (all-gather a layer's shards just before it runs, free the full
weights right after); MeZO itself only ever touches the local shards.

What changes against one process (ShardedMezo, a Mezo whose `_weights` are the local shards):
- z is generated for the shard's global element indices only (zrng keys take an offset): by contract 2 it is the
  same slice of the same values a one-process run generates for the whole tensor.
- The update θ ← R(θ - c·z) runs on the local shard only; the same kernels, the same bits per element.
- The perturbed forwards: θ ± εz is written into the shard from a saved copy of it, the forward all-gathers the
  perturbed shards, and the copy is put back (a copy, so the stored bits come back exactly; nothing is ever
  subtracted back, contract 3). The gathered perturbed weights are bit-identical to one process's perturbed weights.
- The weights digest (`mezo-tune/lowbias32-sum`) is a sum of per-element terms, so each rank sums its shard at its
  global offset and the ranks' sums add up (mod 2**64) to the unsharded tensor's.
So a sharded run's trajectory replays in one process to the gathered sharded weights, bit for bit.

The batch is split over the ranks as in data parallel (train.batch_loss), one forward per rank and sign, so every
rank runs the same collectives. Evals score every eval row on every rank (an eval's number of forwards depends on
its rows, and FSDP's all-gathers must be matched on every rank).
"""

from __future__ import annotations

import contextlib

import torch

from . import zrng
from .distributed import peers_answer
from .mezo import SUM_DIGEST, Mezo, sum_digest_of, tensor_sum_hash


def shard_model(model: torch.nn.Module, device: str) -> None:
    """fully_shard every decoder layer (the classes transformers lists in `_no_split_modules`), then the whole model,
    over all processes, onto `device` (cpu, or this process's cuda device)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard_offset(p) -> int:
    """The global flat index of the first element of this rank's shard of DTensor p (placed Shard(0)).

    FSDP2 splits dim 0 as torch.chunk does: ceil(rows / N) rows per rank, the last ranks holding fewer (or none).
    Checked against the local shard's shape, so a change of that rule fails here rather than drawing wrong z."""
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise RuntimeError(f"expected a DTensor sharded on dim 0, got placements {p.placements}")
    rows, ranks, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    per = -(-rows // ranks)
    start = min(rank * per, rows)
    local = p.to_local()
    if local.shape[0] != min(per, rows - start):
        raise RuntimeError(f"rank {rank} holds {local.shape[0]} of {rows} rows; expected {min(per, rows - start)}")
    return start * (p.numel() // rows) if rows else 0


def reshard(model: torch.nn.Module) -> None:
    """Drop every full weight FSDP still holds, so that the next forward all-gathers the shards as they are now.
    FSDP2 keeps the root module's weights (here the embedding and the final norm) gathered after a forward, and
    would not see shards written since: call this before writing any shard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict gathered onto the host of rank 0 (None on the other ranks); every rank must call
    it. save_pretrained(state_dict=...) writes it as one process's model would be written (tied weights once)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import torch.distributed as dist

    reshard(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights: one tensor again, as in the
        if name in state:                                             # model, so save_pretrained writes it once
            state[name] = state[first.setdefault(id(p), name)]
    return state


class ShardedMezo(Mezo):
    """Mezo over a fully_shard-ed model: perturbs, updates and digests only this rank's shards (see the module)."""

    DEFERS = False  # its perturbed forward copies shards in place, with no pending update to fuse

    def _weights(self):
        return [(name, p.to_local(), shard_offset(p)) for name, p in zip(self.trainable.names, self.trainable.params)]

    @contextlib.contextmanager
    def perturbed(self, step: int, sign: int):
        """Inside this context the model computes with θ + sign·ε·z_step: each touched shard holds its perturbed
        values, formed from a copy of the stored ones that is copied back on the way out."""
        kernel = zrng.kernel(zrng.perturb_kernel, self.use_compile)
        touched = self.directions.touched(self.seed, step, self._names)
        saved = []
        reshard(self.model)
        try:
            with torch.no_grad():
                for name, w, offset in self._weights():
                    if name not in touched or not w.numel():
                        continue
                    stored = self._acquire(w.shape, w.dtype, w.device)
                    stored.copy_(w)
                    saved.append((w, stored))
                    eps = torch.tensor(sign * self.eps, dtype=torch.float64, device=w.device)
                    flat, flat_stored = w.view(-1), stored.view(-1)
                    for a, b, key in self._chunk_keys(step, name, w.numel(), w.device, offset=offset):
                        kernel(flat[a:b], flat_stored[a:b], key, eps, self.distribution)
            yield
        finally:
            reshard(self.model)
            with torch.no_grad():
                for w, stored in saved:
                    w.copy_(stored)
                    self._release(stored)

    def apply_update(self, step: int, c: float) -> None:
        reshard(self.model)
        super().apply_update(step, c)

    def use_digest(self, scheme: dict) -> None:
        if scheme != SUM_DIGEST:
            raise ValueError(f"sharded weights are digested by {SUM_DIGEST['name']} only (the trajectory uses "
                             f"{scheme.get('name')}); resume it in one process")
        super().use_digest(scheme)

    def digest(self) -> bytes:
        """The weights digest of the whole trainable tensors (the same bytes one process computes): each rank's
        shard sums, gathered and added up. Every rank must call it."""
        import torch.distributed as dist

        sums = [tensor_sum_hash(w, offset, device_sum=True) for _, w, offset in self._weights()]
        mine = torch.stack(sums)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        with peers_answer():
            dist.all_gather(every, mine)
        columns = zip(*(t.tolist() for t in every))
        return sum_digest_of(self.trainable.params, [sum(col) % (1 << 64) for col in columns])
