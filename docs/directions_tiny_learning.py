"""Tiny learning sanity check of the direction types: the conftest llama (hidden 32, 2 layers), lm loss on a fixed
batch of 8 sentences of the conftest corpus, N records per type at one lr (eps 1e-3, plain SGD): the loss at records
0, N/4, N/2, 3N/4 and N. Run from the repository root:

    OMP_NUM_THREADS=1 python docs/directions_tiny_learning.py 200 5e-3    # N, lr
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

sys.path.insert(0, "tests")
from conftest import CORPUS, build_model, build_tokenizer  # noqa: E402

from measure_directions import choices  # noqa: E402
from mezo_tune.mezo import Mezo, applied_scale, projected_gradient, trainable_set  # noqa: E402

CHOICES = choices(v_every=10)  # 200 records: V renewed 20 times


def main(n: int, lr: float, eps: float = 1e-3) -> None:
    enc = build_tokenizer()(CORPUS[:8], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for label, directions in CHOICES.items():
        model = build_model("llama")
        trainable = trainable_set(model)
        engine = Mezo(model, trainable, seed=1, eps=eps, directions=directions.resolved(len(trainable.names)))

        def loss():
            return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss

        curve, t0 = [], time.perf_counter()
        for r in range(n + 1):
            if r % (n // 4) == 0:
                with torch.no_grad():
                    curve.append(float(loss()))
            if r < n:
                c = applied_scale(float(np.float32(lr)), projected_gradient(*engine.loss_pair(r, loss), eps))
                if c is not None:
                    engine.apply_update(r, c)
        print(f"{label:24}", " ".join(f"{x:.4f}" for x in curve), f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
