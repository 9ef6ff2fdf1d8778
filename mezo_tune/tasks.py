"""Losses and metrics: what a batch of rows costs a model (the fp32 scalar MeZO differences) and how a model
scores on a data set.

Two tasks: `lm` (next-token cross-entropy over the text) and `classification` (a verbalizer maps each label to
a word; a label's score is the log-probability of its word after the prompt; the loss is the cross-entropy of
the softmax over label scores, as in the MeZO paper).

Sequences are right-padded with an attention mask. In a causal model, padding after a sequence cannot change
its earlier positions, so a row's loss does not depend on which other rows share its batch. Logits are cast to
float32 before any log-softmax: a loss is never reduced in fp16/bf16.
"""

from __future__ import annotations

import inspect
import math
import string
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data import DataError, ErrorCollector

__all__ = ["Task", "LMTask", "ClassificationTask", "build_task", "template_fields"]


def template_fields(template: str) -> tuple[str, ...]:
    """Row fields a str.format template reads, in order of first use ("{row[x]}" and "{a.b}" read "row", "a")."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string: {e}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split(".", 1)[0].split("[", 1)[0]
        if root == "" or root.isdigit():
            raise ValueError(f"template {template!r} uses a positional field '{{{name}}}'; "
                             f"name the row field instead, e.g. '{{text}}'")
        if root not in fields:
            fields.append(root)
    return tuple(fields)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad token nor an eos token; "
                     "set one (tokenizer.pad_token = ...) or use a tokenizer that defines an eos token")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _forward_params(model) -> set[str]:
    """Named parameters of model.forward; for a wrapper taking **kwargs (e.g. a PEFT model), its base model's."""
    params = inspect.signature(model.forward).parameters
    names = set(params)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_kwargs and hasattr(model, "get_base_model"):
        names |= set(inspect.signature(model.get_base_model().forward).parameters)
    return names


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


class Task:
    """A loss for training and metrics for evaluation over rows of a data set (dicts read from JSONL)."""

    required_fields: tuple[str, ...] = ()

    def __init__(self, tokenizer, max_length: int, template: str = "{text}"):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template = template
        self.template_fields = template_fields(template)
        self.pad_id = _pad_id(tokenizer)

    # -- rows ------------------------------------------------------------------------------------------------
    def format(self, row: dict) -> str:
        return self.template.format(**row)

    def _check_template(self, row: Any, where: str, errors: ErrorCollector) -> bool:
        if not isinstance(row, dict):
            errors.add(f"{where}: expected a JSON object")
            return False
        missing = [f for f in self.template_fields if f not in row]
        if missing:
            names = ", ".join(repr(f) for f in missing)
            errors.add(f"{where}: missing field{'s' if len(missing) > 1 else ''} {names} (used by the template)")
            return False
        try:
            self.format(row)
        except Exception as e:  # a format spec that does not fit the value, an attribute that is not there, ...
            errors.add(f"{where}: the template {self.template!r} cannot be formatted with this row "
                       f"({type(e).__name__}: {e})")
            return False
        return True

    def check_rows(self, rows: Sequence[dict], source: str) -> None:
        """Raise one DataError listing (up to 10) rows this task cannot use, as `source:line: problem`.

        Row i is line i+1 of `source`, as `data.read_jsonl` guarantees."""
        errors = ErrorCollector()
        for i, row in enumerate(rows):
            self._check_row(row, f"{source}:{i + 1}", errors)
        errors.raise_if_any()

    def _check_row(self, row: dict, where: str, errors: ErrorCollector) -> None:
        self._check_template(row, where, errors)

    # -- model calls -----------------------------------------------------------------------------------------
    def _logits(self, model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None):
        """Forward under no_grad; returns (logits in the model's dtype, positions they belong to or None = all)."""
        params = _forward_params(model)
        kwargs = {}
        if "use_cache" in params:
            kwargs["use_cache"] = False  # no KV cache: we never generate
        if keep is not None and "logits_to_keep" not in params:
            keep = None
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
        if keep is not None and logits.shape[1] != keep.numel():
            if logits.shape[1] != ids.shape[1]:
                raise RuntimeError(f"model returned logits for {logits.shape[1]} positions; expected "
                                   f"{keep.numel()} (logits_to_keep) or {ids.shape[1]} (all)")
            keep = None  # the model ignored logits_to_keep and returned every position
        return logits, keep

    def loss_terms(self, model, rows: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (loss sum, weight), both fp32 of shape (len(rows),); the batch loss is sum/sum."""
        raise NotImplementedError

    def loss(self, model, rows: Sequence[dict]) -> torch.Tensor:
        """The fp32 scalar loss of the batch: sum of per-row loss sums over the sum of their weights."""
        if not rows:
            raise ValueError("loss of an empty batch")
        sums, weights = self.loss_terms(model, rows)
        return sums.sum() / weights.sum()

    def evaluate(self, model, rows: Sequence[dict], batch_size: int = 16, progress: bool = False) -> dict:
        raise NotImplementedError

    def _batches(self, rows: Sequence[dict], batch_size: int, progress: bool, desc: str):
        if not rows:
            raise ValueError("evaluate needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        starts = range(0, len(rows), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, leave=False, unit="batch")
        for s in starts:
            yield rows[s: s + batch_size]


class LMTask(Task):
    """Causal language modelling: mean next-token cross-entropy over every non-pad predicted token."""

    def __init__(self, tokenizer, max_length: int, template: str = "{text}"):
        super().__init__(tokenizer, max_length, template)
        self.required_fields = self.template_fields

    def encode(self, row: dict) -> list[int]:
        ids = self.tokenizer(self.format(row), add_special_tokens=True).input_ids
        return list(ids[: self.max_length])

    def _check_row(self, row, where, errors):
        if self._check_template(row, where, errors) and len(self.encode(row)) < 2:
            errors.add(f"{where}: the text is shorter than 2 tokens, so there is no next token to predict")

    def loss_terms(self, model, rows):
        seqs = [self.encode(r) for r in rows]
        ids, mask = _right_pad(seqs, self.pad_id, _device(model))
        logits, _ = self._logits(model, ids, mask)
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool()
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # (B, T-1)
        nll = torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
        counts = valid.sum(dim=1).float()
        if not bool((counts > 0).any()):
            raise ValueError("every row of this batch is shorter than 2 tokens; there is nothing to predict")
        return nll.sum(dim=1), counts

    def evaluate(self, model, rows, batch_size=16, progress=False):
        total, tokens = 0.0, 0
        for batch in self._batches(rows, batch_size, progress, "eval"):
            sums, counts = self.loss_terms(model, batch)
            total += float(sums.double().sum())
            tokens += int(counts.sum())
        loss = total / tokens if tokens else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                "n": len(rows), "tokens": tokens}


class ClassificationTask(Task):
    """Verbalizer classification: score(label) = sum of log p(word tokens | prompt); loss = cross-entropy of
    softmax(scores) against the row's label; prediction = argmax (ties go to the first label).

    When every label word is one token, one forward over the prompts suffices (`single_token` True); otherwise
    every (row, label) pair runs as prompt+word. `use_logits_to_keep` lets the LM head run only on the
    positions that are scored, where the model's forward supports it.
    """

    def __init__(self, tokenizer, max_length: int, verbalizer: dict, template: str = "{text}",
                 force_general: bool = False, use_logits_to_keep: bool = True):
        super().__init__(tokenizer, max_length, template)
        if not verbalizer:
            raise ValueError("a classification task needs a verbalizer: a table label -> word, "
                             "e.g. {positive = \" great\", negative = \" terrible\"}")
        self.labels: tuple[str, ...] = tuple(str(k) for k in verbalizer)
        self.words: tuple[str, ...] = tuple(verbalizer.values())
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.word_ids: list[list[int]] = []
        for label, word in zip(self.labels, self.words):
            if not isinstance(word, str):
                raise ValueError(f"verbalizer word for label {label!r} must be a string, got {word!r}")
            ids = list(tokenizer(word, add_special_tokens=False).input_ids)
            if not ids:
                raise ValueError(f"verbalizer word {word!r} for label {label!r} tokenizes to no tokens")
            self.word_ids.append(ids)
        seen: dict[tuple[int, ...], str] = {}
        for label, ids in zip(self.labels, self.word_ids):
            if tuple(ids) in seen:
                raise ValueError(f"labels {seen[tuple(ids)]!r} and {label!r} have the same verbalizer tokens "
                                 f"{ids}; the model could not tell them apart")
            seen[tuple(ids)] = label
        self.max_word_len = max(len(w) for w in self.word_ids)
        if max_length - self.max_word_len < 1:
            raise ValueError(f"max_length {max_length} leaves no room for a prompt before a "
                             f"{self.max_word_len}-token verbalizer word")
        self.required_fields = tuple(self.template_fields) + (("label",) if "label" not in self.template_fields else ())
        self.single_token = all(len(w) == 1 for w in self.word_ids) and not force_general
        self.use_logits_to_keep = use_logits_to_keep

    # -- rows ------------------------------------------------------------------------------------------------
    def label_of(self, row: dict) -> int:
        label = row["label"]
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)  # JSON 1 matches verbalizer key "1" (TOML keys are always strings)
        if not isinstance(label, str) or label not in self.label_index:
            raise DataError(f"label {row['label']!r} is not in the verbalizer ({', '.join(self.labels)})")
        return self.label_index[label]

    def _check_row(self, row, where, errors):
        if not self._check_template(row, where, errors):
            return
        if "label" not in row:
            errors.add(f"{where}: missing field 'label'")
            return
        try:
            self.label_of(row)
        except DataError as e:
            errors.add(f"{where}: {e}")

    def prompt_ids(self, row: dict) -> list[int]:
        """Prompt tokens, cut from the left so that prompt + the longest label word fits max_length."""
        ids = list(self.tokenizer(self.format(row), add_special_tokens=True).input_ids)
        room = self.max_length - self.max_word_len
        return ids[-room:] if len(ids) > room else ids

    # -- scoring ---------------------------------------------------------------------------------------------
    def scores(self, model, rows: Sequence[dict]) -> torch.Tensor:
        """Label scores, fp32 (len(rows), n_labels): sum of log-probs of each label word's tokens after the prompt."""
        prompts = [self.prompt_ids(r) for r in rows]
        if not all(prompts):
            raise ValueError("a prompt tokenizes to no tokens; nothing to condition the label word on")
        return self._scores_single(model, prompts) if self.single_token else self._scores_general(model, prompts)

    def _keep(self, positions: torch.Tensor) -> torch.Tensor | None:
        return torch.unique(positions) if self.use_logits_to_keep else None  # sorted, distinct

    def _scores_single(self, model, prompts):
        device = _device(model)
        ids, mask = _right_pad(prompts, self.pad_id, device)
        last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=device)
        logits, kept = self._logits(model, ids, mask, self._keep(last))
        col = last if kept is None else torch.searchsorted(kept, last)
        rows = torch.arange(len(prompts), device=logits.device)
        logp = torch.log_softmax(logits[rows, col.to(logits.device)].float(), dim=-1)  # (B, V) in fp32
        label_tokens = torch.tensor([w[0] for w in self.word_ids], dtype=torch.long, device=logp.device)
        return logp[:, label_tokens]

    def _scores_general(self, model, prompts):
        device = _device(model)
        n_labels = len(self.word_ids)
        seqs = [p + w for p in prompts for w in self.word_ids]  # row-major: (row 0, label 0), (row 0, label 1), ...
        ids, mask = _right_pad(seqs, self.pad_id, device)
        # The logit predicting word token k of a pair sits at position len(prompt) - 1 + k. Pairs whose word is
        # shorter than the longest one repeat a valid position with weight 0; summing over a fixed-size axis
        # (not a scatter-add, which is atomic and unordered on GPUs) keeps the scores bit-reproducible.
        width = self.max_word_len
        pos, tok, valid = [], [], []
        for p in prompts:
            for w in self.word_ids:
                pos.append([len(p) - 1 + min(k, len(w) - 1) for k in range(width)])
                tok.append([w[min(k, len(w) - 1)] for k in range(width)])
                valid.append([k < len(w) for k in range(width)])
        pos = torch.tensor(pos, dtype=torch.long, device=device)  # (pairs, width)
        logits, kept = self._logits(model, ids, mask, self._keep(pos.flatten()))
        col = pos if kept is None else torch.searchsorted(kept, pos)
        pair = torch.arange(len(seqs), device=logits.device)[:, None]
        logp = torch.log_softmax(logits[pair, col.to(logits.device)].float(), dim=-1)  # (pairs, width, V)
        tok = torch.tensor(tok, dtype=torch.long, device=logp.device)
        valid = torch.tensor(valid, dtype=torch.bool, device=logp.device)
        token_logp = logp.gather(2, tok[..., None])[..., 0]
        token_logp = torch.where(valid, token_logp, torch.zeros((), dtype=token_logp.dtype, device=logp.device))
        return token_logp.sum(dim=1).view(len(prompts), n_labels)

    def loss_terms(self, model, rows):
        targets = torch.tensor([self.label_of(r) for r in rows], dtype=torch.long)
        scores = self.scores(model, rows)
        ce = F.cross_entropy(scores, targets.to(scores.device), reduction="none")
        return ce, torch.ones_like(ce)

    def loss(self, model, rows):
        """Mean over the batch of the cross-entropy of softmax(label scores) against each row's label."""
        if not rows:
            raise ValueError("loss of an empty batch")
        ce, _ = self.loss_terms(model, rows)
        return ce.mean()

    @staticmethod
    def predict(scores: torch.Tensor) -> list[int]:
        """Argmax per row; a tie goes to the first label in verbalizer order."""
        out = []
        for row in scores.tolist():
            best = max(row)
            out.append(row.index(best))
        return out

    def evaluate(self, model, rows, batch_size=16, progress=False):
        per_class = {label: {"n": 0, "correct": 0, "predicted": 0} for label in self.labels}
        correct, ce_total = 0, 0.0
        for batch in self._batches(rows, batch_size, progress, "eval"):
            targets = [self.label_of(r) for r in batch]
            scores = self.scores(model, batch)
            ce = F.cross_entropy(scores, torch.tensor(targets, dtype=torch.long, device=scores.device),
                                 reduction="none")
            ce_total += float(ce.double().sum())
            for t, p in zip(targets, self.predict(scores)):
                per_class[self.labels[t]]["n"] += 1
                per_class[self.labels[p]]["predicted"] += 1
                if t == p:
                    per_class[self.labels[t]]["correct"] += 1
                    correct += 1
        n = len(rows)
        return {"accuracy": correct / n, "n": n, "correct": correct, "per_class": per_class, "loss": ce_total / n}


def build_task(task_cfg, tokenizer, max_length: int) -> Task:
    """The task a recipe's [task] table describes: `type` ("lm" | "classification"), `template`, `verbalizer`."""
    kind = getattr(task_cfg, "type", None)
    template = getattr(task_cfg, "template", None) or "{text}"
    if kind == "lm":
        return LMTask(tokenizer, max_length, template)
    if kind == "classification":
        return ClassificationTask(tokenizer, max_length, getattr(task_cfg, "verbalizer", None), template)
    raise ValueError(f"unknown task type {kind!r}; expected 'lm' or 'classification'")
