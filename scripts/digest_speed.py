"""Time the weights digest of a SmolLM2-135M-shaped trainable set (random fp32 tensors of its shapes, 134.5M
elements; no model is loaded): blake2b-256 of the host bytes (format 1 and 2 keyframes) against the on-device
integer sum (mezo-tune/lowbias32-sum v1, format 3).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/digest_speed.py [--device cuda] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mezo_tune.mezo import BLAKE2B_DIGEST, SUM_DIGEST, weights_digest

# SmolLM2-135M (Llama): vocab 49152, hidden 576, MLP 1536, 30 layers, 9 heads / 3 KV heads of 64, tied embedding.
VOCAB, HIDDEN, MLP, LAYERS, KV = 49152, 576, 1536, 30, 192
LAYER = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP),
         (HIDDEN,), (HIDDEN,)]
SHAPES = [(VOCAB, HIDDEN)] + LAYER * LAYERS + [(HIDDEN,)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g).to(args.device) for s in SHAPES]
    n = sum(t.numel() for t in tensors)
    print(f"{len(tensors)} tensors, {n:,} fp32 elements ({4 * n / 2**20:.0f} MiB) on {args.device}, "
          f"{torch.get_num_threads()} thread(s); median of {args.repeat}")
    for scheme in (BLAKE2B_DIGEST, SUM_DIGEST):
        times = []
        for _ in range(args.repeat):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            weights_digest(tensors, scheme)  # returns bytes on the host: any device work has finished
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{scheme['name']} v{scheme['version']}: {med:.3f} s ({4 * n / med / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
