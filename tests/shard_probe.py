"""Run by tests/test_sharded.py under `torchrun --nproc-per-node 2` (gloo, CPU): a tiny llama (vocab 321, so the
embedding's 321 rows split 161 / 160) fully_shard-ed by sharded.shard_model, next to an unsharded copy of it. Writes
what it finds to $OUT/rank<r>.json, for the test to assert on:
  offsets:    each tensor's (rows held, global flat offset of its shard)
  z:          the shard's z (as the engine keys it) == the slice [offset, offset + n) of the whole tensor's z
  perturbed:  inside ShardedMezo.perturbed, the shard == the same elements of the whole tensor perturbed in one process
  forwards:   the logits of perturbed forwards (+, -, + again) and of one after the update == one process's
  restored:   after the perturbed forwards, every shard bit-equal to before (contract 3)
  updated:    after apply_update, the gathered tensors == one process's Mezo.apply_update, bit for bit
  stochastic: a stochastically rounded update, gathered == one process's
  digest:     ShardedMezo.digest() == Mezo.digest() of the unsharded model, before and after the update
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_model  # noqa: E402

from mezo_tune import zrng  # noqa: E402
from mezo_tune.mezo import Mezo, trainable_set  # noqa: E402
from mezo_tune.sharded import ShardedMezo, shard_model, shard_offset  # noqa: E402

SEED, STEP, EPS, C = 11, 3, 1e-3, 0.25


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    whole = build_model("llama", vocab_size=321)
    model = copy.deepcopy(whole)
    shard_model(model, "cpu")
    one = Mezo(whole, trainable_set(whole), seed=SEED, eps=EPS)
    sharded = ShardedMezo(model, trainable_set(model), seed=SEED, eps=EPS)
    found: dict = {"offsets": {}, "z": True, "perturbed": True, "restored": True, "updated": True}
    full = dict(zip(one.trainable.names, one.trainable.params))
    before = {name: w.clone() for name, w, _ in sharded._weights()}
    found["digest_before"] = sharded.digest() == one.digest()
    for name, w, offset in sharded._weights():
        found["offsets"][name] = [w.shape[0], offset]
        n = w.numel()
        z = torch.empty(n)
        for a, b, key in sharded._chunk_keys(STEP, name, n, w.device, offset=offset):
            zrng.z_kernel(z[a:b], key, "gaussian")
        whole_z = zrng.z_for(SEED, STEP, name, full[name].numel())
        found["z"] &= torch.equal(z, whole_z[offset: offset + n])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), sharded.perturbed(STEP, +1):
        model(input_ids=ids)
        for name, w, offset in sharded._weights():
            expected = (full[name].reshape(-1).float() + torch.tensor(EPS, dtype=torch.float64).float()
                        * zrng.z_for(SEED, STEP, name, full[name].numel())).to(w.dtype)
            found["perturbed"] &= torch.equal(w.reshape(-1), expected[offset: offset + w.numel()])
    found["forwards"] = []  # each perturbed forward's logits == one process's, bit for bit (the same weights)
    for sign in (+1, -1, +1):
        with torch.no_grad(), sharded.perturbed(STEP, sign), one.perturbed(STEP, sign):
            found["forwards"].append(torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits))
    for name, w, _ in sharded._weights():
        found["restored"] &= torch.equal(w, before[name])
    sharded.apply_update(STEP, C)
    one.apply_update(STEP, C)
    for name, p in zip(sharded.trainable.names, sharded.trainable.params):
        found["updated"] &= torch.equal(p.full_tensor(), full[name])
    found["digest_after"] = sharded.digest() == one.digest()
    # stochastic rounding: its uniforms come from zrng's rounding stream, keyed at the shard's offset too
    rounding = dict(seed=SEED, eps=EPS, rounding="stochastic")
    ShardedMezo(model, sharded.trainable, **rounding).apply_update(STEP + 1, C)
    Mezo(whole, one.trainable, **rounding).apply_update(STEP + 1, C)
    found["stochastic"] = all(torch.equal(p.full_tensor(), full[name])
                              for name, p in zip(sharded.trainable.names, sharded.trainable.params))
    with torch.no_grad():
        found["forwards"].append(torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits))
    found["offset_of_embedding"] = shard_offset(sharded.trainable.params[0])
    Path(os.environ["PROBE_OUT"], f"rank{rank}.json").write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
