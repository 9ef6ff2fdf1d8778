"""Step time of one process against two with sharded weights (README, "Sharded weights").

    OMP_NUM_THREADS=1 python docs/bench_sharded.py [WORKDIR]

Builds a random Llama (vocab 321, hidden 512, 8 layers, 19.0M parameters, fp32; the tokenizer of tests/conftest.py)
in WORKDIR (default /tmp/bench-sharded), trains the same 20-step recipe (batch 8 rows of the test corpus, <= 24
tokens, compile off) in one process and under `torchrun --nproc-per-node 2` with `[distributed] shard_weights =
true`, checks that the sharded run replays to its final weights, and prints the median s/step of steps 4-20 of each.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, "tests")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from conftest import CORPUS, build_tokenizer, write_jsonl  # noqa: E402
from test_train import write_recipe  # noqa: E402


def main(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=321, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(work / "model")
    build_tokenizer().save_pretrained(work / "model")
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    train = write_jsonl(work / "train.jsonl", [{"text": t} for t in CORPUS] * 4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    train_cmd = ["-m", "mezo_tune", "train", "-q"]
    runs = {"1 process": [sys.executable, *train_cmd],
            "2 processes, sharded": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node=2", *train_cmd]}
    for i, (label, cmd) in enumerate(runs.items()):
        recipe = write_recipe(work / f"run{i}.toml", work / "model", train, out=work / f"run{i}", steps=20,
                              batch_size=8, max_length=24, log_every=1)
        if i:
            recipe.write_text(recipe.read_text() + "\n[distributed]\nshard_weights = true\n")
        subprocess.run([*cmd, str(recipe)], env=env, check=True, capture_output=True)
        times = [json.loads(line)["s_per_step"] for line in (work / f"run{i}/metrics.jsonl").read_text().splitlines()
                 if "s_per_step" in line][3:]
        print(f"{label}: median {statistics.median(times):.2f} s/step (steps 4-20: {min(times):.2f}-{max(times):.2f})")
    subprocess.run([sys.executable, "-m", "mezo_tune", "replay", str(work / "run1/trajectory.mezo"), "--out",
                    str(work / "replayed"), "--verify", "-q"], env=env, check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench-sharded"))
