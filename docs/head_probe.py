"""How far can training only the classifier head go? (issue #15: a candidate that lost)

Caches SmolLM2-135M-Instruct's last-token hidden state (before the final RMSNorm) for the Rotten Tomatoes splits,
then trains, on those frozen features, what the task's loss sees of the head: the two verbalizer rows of the tied
embedding (" negative", " positive"), the final norm's weight, or both — with backprop (AdamW, 2000 steps of 16: the
ceiling) and with two-point zeroth-order SGD (ε 1e-3, batch 16, 1200 steps, three lrs). Dev accuracy every 100 steps.

    mezo-tune data rotten-tomatoes --out data/rt && python docs/head_probe.py data/rt

Features take ~3 min on 2 idle cores (the rest is seconds). Measured numbers: README, "Learning", what lost.
"""
import json
import sys

import torch
import torch.nn.functional as F

from mezo_tune.models import load_model, load_tokenizer, resolve_source

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = (" negative", " positive")


def features(model, tok, rows):
    """The last prompt token's hidden state entering the final norm, one row per review."""
    seen = {}
    handle = model.model.norm.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    out = []
    for i in range(0, len(rows), 16):
        ids = [tok(TEMPLATE.format(text=r["text"]))["input_ids"][:128] for r in rows[i:i + 16]]
        width = max(map(len, ids))
        inp = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        with torch.no_grad():
            model(input_ids=inp, attention_mask=mask, logits_to_keep=1)
        out.append(seen["x"][torch.arange(len(ids)), torch.tensor([len(x) - 1 for x in ids])])
    handle.remove()
    return torch.cat(out)


def main(data_dir: str) -> None:
    torch.manual_seed(0)
    src = resolve_source("embedded:smollm2-135m")
    tok, model = load_tokenizer(src), load_model(src, "float32", "cpu").eval()
    eps_norm = model.config.rms_norm_eps
    word_ids = [tok(w)["input_ids"][0] for w in WORDS]
    head = {"E": model.model.embed_tokens.weight[word_ids].detach().clone(),
            "norm": model.model.norm.weight.detach().clone()}
    data = {}
    for split in ("train", "eval", "test"):
        rows = [json.loads(line) for line in open(f"{data_dir}/{split}.jsonl")]
        x = features(model, tok, rows)
        data[split] = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps_norm),
                       torch.tensor([r["label"] == "positive" for r in rows]).long())

    def loss(p, x, y):
        return F.cross_entropy((x * p["norm"]) @ p["E"].T, y)

    def acc(p, split):
        x, y = data[split]
        return ((x * p["norm"]) @ p["E"].T).argmax(-1).eq(y).float().mean().item()

    print(f"zero-shot: dev {acc(head, 'eval'):.3f} test {acc(head, 'test'):.3f}")
    n = len(data["train"][1])
    for which in (["E"], ["norm"], ["norm", "E"]):
        p = {k: v.clone().requires_grad_(k in which) for k, v in head.items()}
        opt = torch.optim.AdamW([p[k] for k in which], lr=1e-3, weight_decay=0)
        for _ in range(2000):
            i = torch.randint(0, n, (16,))
            opt.zero_grad()
            loss(p, data["train"][0][i], data["train"][1][i]).backward()
            opt.step()
        with torch.no_grad():
            print(f"backprop {'+'.join(which)}: dev {acc(p, 'eval'):.3f} test {acc(p, 'test'):.3f}")
    for which in (["E"], ["norm"], ["norm", "E"]):
        for lr in (1e-4, 1e-3, 1e-2):
            g = torch.Generator().manual_seed(0)
            p, curve = {k: v.clone() for k, v in head.items()}, []
            for t in range(1200):
                i = torch.randint(0, n, (16,), generator=g)
                x, y = data["train"][0][i], data["train"][1][i]
                z = {k: torch.randn(p[k].shape, generator=g) for k in which}
                plus = loss({k: p[k] + 1e-3 * z[k] if k in z else p[k] for k in p}, x, y)
                minus = loss({k: p[k] - 1e-3 * z[k] if k in z else p[k] for k in p}, x, y)
                for k in which:
                    p[k] -= lr * float((plus - minus) / 2e-3) * z[k]
                if t % 100 == 99:
                    curve.append(round(acc(p, "eval"), 3))
            print(f"zeroth-order {'+'.join(which)} lr {lr:g}: dev every 100 steps {curve}, "
                  f"test {acc(p, 'test'):.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/rt")
