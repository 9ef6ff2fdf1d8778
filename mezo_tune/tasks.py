"""Losses and metrics: what a batch of rows costs a model (the fp32 scalar MeZO differences) and how a model
scores on a data set.

Four tasks: `lm` (next-token cross-entropy over the text), `classification` (a verbalizer maps each label to
a word; a label's score is the log-probability of its word after the prompt; the loss is the cross-entropy of
the softmax over label scores, as in the MeZO paper), `multiple_choice` (each candidate completion scored by its
summed or length-normalised log-likelihood; cross-entropy over the candidates) and `generation` (cross-entropy on
the answer tokens; evaluated by greedy decoding with SQuAD exact match and token F1).

An objective other than cross-entropy ("accuracy", "f1") makes the loss the negative metric on the batch: MeZO
needs no gradient, so a piecewise-constant loss still trains (with an eps large enough to flip predictions).

Sequences are right-padded with an attention mask. In a causal model, padding after a sequence cannot change
its earlier positions, so a row's loss does not depend on which other rows share its batch. Logits are cast to
float32 before any log-softmax: a loss is never reduced in fp16/bf16.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import string
from collections import Counter
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data import DataError, ErrorCollector

__all__ = ["SharedPrefix", "Task", "LMTask", "ClassificationTask", "MultipleChoiceTask", "GenerationTask", "build_task",
           "template_fields", "normalize_answer", "exact_match", "token_f1"]


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


class SharedPrefix:
    """Keys and values of the tokens every prompt starts with (in-context demonstrations), computed once per
    evaluation and reused by every batch: a 16-shot prompt then costs a forward over its own ~40 tokens instead of
    ~700. Scores agree with the full forward up to float rounding (attention sums in another order)."""

    def __init__(self, model, ids: list[int]):
        self.ids = ids
        self.length = len(ids)
        self.argument = self.cache_argument(model)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=_device(model)), use_cache=True)
        self.cache = getattr(out, self.argument)

    def covers(self, prompts: Sequence[Sequence[int]]) -> bool:
        """Every prompt starts with the prefix tokens and has at least one token of its own."""
        n = self.length
        return all(len(p) > n and list(p[:n]) == self.ids for p in prompts)

    def cache_for(self, batch: int):
        """A fresh copy for one forward (which appends to it), repeated to the batch size."""
        import copy

        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache

    @staticmethod
    def cache_argument(model) -> str | None:
        """The name model.forward takes a KV cache by (and its output returns it by): "cache" from transformers 5.24,
        "past_key_values" before; None when it takes none."""
        params = _forward_params(model)
        return next((name for name in ("cache", "past_key_values") if name in params), None)

    @classmethod
    def supported(cls, model) -> bool:
        """Needs a forward that takes a KV cache; a PEFT prompt-learning model (prefix tuning) supplies its own and
        cannot take ours."""
        config = getattr(model, "active_peft_config", None)
        if config is not None and getattr(config, "is_prompt_learning", False):
            return False
        return cls.cache_argument(model) is not None


class Task:
    """A loss for training and metrics for evaluation over rows of a data set (dicts read from JSONL)."""

    required_fields: tuple[str, ...] = ()
    objectives: tuple[str, ...] = ("cross_entropy",)

    def __init__(self, tokenizer, max_length: int, template: str = "{text}"):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template = template
        self.template_fields = template_fields(template)
        self.pad_id = _pad_id(tokenizer)
        self.objective = "cross_entropy"
        self.prefix = ""  # in-context demonstrations put before every prompt (set_demonstrations)
        self._shared: SharedPrefix | None = None  # their keys and values, while evaluate() runs
        self.grad = False  # True while backprop.py trains: forwards keep the autograd graph

    def set_objective(self, objective: str) -> None:
        if objective not in self.objectives:
            raise ValueError(f"objective {objective!r} is not available for this task; "
                             f"expected one of {', '.join(self.objectives)}")
        self.objective = objective

    # -- rows ------------------------------------------------------------------------------------------------
    def format(self, row: dict) -> str:
        return self.prefix + self.template.format(**row)

    def demonstration(self, row: dict) -> str:
        """A training row as an in-context example: the formatted prompt followed by its gold answer."""
        return self.template.format(**row)

    def set_demonstrations(self, rows: Sequence[dict], separator: str = "\n\n") -> None:
        """Put `rows`, each formatted with its gold answer, joined by `separator`, before every prompt."""
        self.prefix = "".join(self.demonstration(r) + separator for r in rows)

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

    def check_rows(self, rows: Sequence[dict], source: str, where: Sequence[str] | None = None) -> None:
        """Raise one DataError listing (up to 10) rows this task cannot use, as `source:line: problem`.

        Row i is line i+1 of `source`, as `data.read_jsonl` guarantees, unless `where` names each row's place
        (`data.read_rows` gives it for CSV files and Hugging Face datasets)."""
        errors = ErrorCollector()
        for i, row in enumerate(rows):
            self._check_row(row, where[i] if where is not None else f"{source}:{i + 1}", errors)
        errors.raise_if_any()

    def _check_row(self, row: dict, where: str, errors: ErrorCollector) -> None:
        self._check_template(row, where, errors)

    # -- model calls -----------------------------------------------------------------------------------------
    def _logits(self, model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None,
                past: SharedPrefix | None = None):
        """Forward under no_grad; returns (logits in the model's dtype, positions they belong to or None = all).
        With `past`, ids and positions are those after the shared prefix, whose keys and values are reused."""
        params = _forward_params(model)
        kwargs = {}
        if past is not None:
            kwargs[past.argument] = past.cache_for(ids.shape[0])
            kwargs["use_cache"] = True
            mask = torch.cat([mask.new_ones(ids.shape[0], past.length), mask], dim=1)
        elif "use_cache" in params:
            kwargs["use_cache"] = False  # no KV cache: we never generate
        if keep is not None and "logits_to_keep" not in params:
            keep = None
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        with torch.set_grad_enabled(self.grad):
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

    def metric_terms(self, model, rows: Sequence[dict]) -> torch.Tensor:
        """Per-row value of the objective's metric (1 = right), fp32 of shape (len(rows),)."""
        raise NotImplementedError

    def loss(self, model, rows: Sequence[dict]) -> torch.Tensor:
        """The fp32 scalar loss of the batch: sum of per-row loss sums over the sum of their weights; for a
        metric objective, minus the batch mean of the metric."""
        if not rows:
            raise ValueError("loss of an empty batch")
        if self.objective != "cross_entropy":
            return -self.metric_terms(model, rows).mean()
        sums, weights = self.loss_terms(model, rows)
        return sums.sum() / weights.sum()

    def loss_sums(self, model, rows: Sequence[dict]) -> tuple[float, float]:
        """(numerator, denominator) of `loss` over these rows, in float64: a data-parallel rank's shard of the batch,
        added to the other ranks' before dividing (distributed.global_losses)."""
        if self.objective != "cross_entropy":
            return -float(self.metric_terms(model, rows).double().sum()), float(len(rows))
        sums, weights = self.loss_terms(model, rows)
        return float(sums.double().sum()), float(weights.double().sum())

    def evaluate(self, model, rows: Sequence[dict], batch_size: int = 16, progress: bool = False,
                 reduce=None) -> dict:
        """The task's metrics over rows. reduce (data parallel): rows are this rank's shard, and reduce sums the
        eval sums over every rank (distributed.reduce_eval_sums), so that each rank returns the metrics of all."""
        sums = self.eval_sums(model, rows, batch_size, progress)
        if reduce is not None:
            sums = reduce(sums)
        if not sums["n"]:
            raise ValueError("evaluate needs at least one row")
        return self.summarize(sums)

    def eval_sums(self, model, rows: Sequence[dict], batch_size: int, progress: bool) -> dict:
        """Sums (numbers, or flat lists of numbers) over rows that the metrics are computed from; "n": the rows."""
        raise NotImplementedError

    def summarize(self, sums: dict) -> dict:
        """The metrics of eval_sums' sums."""
        raise NotImplementedError

    def _batches(self, rows: Sequence[dict], batch_size: int, progress: bool, desc: str):
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

    def eval_sums(self, model, rows, batch_size, progress):
        total, tokens = 0.0, 0
        for batch in self._batches(rows, batch_size, progress, "eval"):
            sums, counts = self.loss_terms(model, batch)
            total += float(sums.double().sum())
            tokens += int(counts.sum())
        return {"nll": total, "tokens": tokens, "n": len(rows)}

    def summarize(self, sums):
        loss = sums["nll"] / sums["tokens"] if sums["tokens"] else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                "n": sums["n"], "tokens": sums["tokens"]}


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

    objectives = ("cross_entropy", "accuracy")

    def demonstration(self, row):
        return self.template.format(**row) + self.words[self.label_of(row)]

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
        past = self._shared if self._shared is not None and self._shared.covers(prompts) else None
        if past is not None:
            prompts = [p[past.length:] for p in prompts]
        score = self._scores_single if self.single_token else self._scores_general
        return score(model, prompts, past)

    def _keep(self, positions: torch.Tensor) -> torch.Tensor | None:
        return torch.unique(positions) if self.use_logits_to_keep else None  # sorted, distinct

    def _scores_single(self, model, prompts, past=None):
        device = _device(model)
        ids, mask = _right_pad(prompts, self.pad_id, device)
        last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=device)
        logits, kept = self._logits(model, ids, mask, self._keep(last), past)
        col = last if kept is None else torch.searchsorted(kept, last)
        rows = torch.arange(len(prompts), device=logits.device)
        logp = torch.log_softmax(logits[rows, col.to(logits.device)].float(), dim=-1)  # (B, V) in fp32
        label_tokens = torch.tensor([w[0] for w in self.word_ids], dtype=torch.long, device=logp.device)
        return logp[:, label_tokens]

    def _scores_general(self, model, prompts, past=None):
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
        logits, kept = self._logits(model, ids, mask, self._keep(pos.flatten()), past)
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
        if self.objective != "cross_entropy":
            return super().loss(model, rows)
        ce, _ = self.loss_terms(model, rows)
        return ce.mean()

    def metric_terms(self, model, rows):
        targets = [self.label_of(r) for r in rows]
        predicted = self.predict(self.scores(model, rows))
        return torch.tensor([float(p == t) for p, t in zip(predicted, targets)], dtype=torch.float32)

    @staticmethod
    def predict(scores: torch.Tensor) -> list[int]:
        """Argmax per row; a tie goes to the first label in verbalizer order."""
        out = []
        for row in scores.tolist():
            best = max(row)
            out.append(row.index(best))
        return out

    def share_prefix(self, model, rows: Sequence[dict]) -> None:
        """With demonstrations, compute the tokens all of `rows`' prompts start with once, for the evaluate() that
        follows (the model must not change until it returns). The tokens are taken from the prompts themselves, not
        from the demonstrations alone: a tokenizer may split the text at their boundary differently ("\n\n" is one
        token at the end of a text, two before "Review")."""
        self._shared = None
        if not (self.prefix and rows and not self.grad and SharedPrefix.supported(model)):
            return
        prompts = [self.prompt_ids(r) for r in rows]
        first, n = prompts[0], min(len(p) for p in prompts) - 1  # every prompt keeps a token of its own
        for p in prompts[1:]:
            k = 0
            while k < n and p[k] == first[k]:
                k += 1
            n = k
        if n:
            self._shared = SharedPrefix(model, first[:n])

    def evaluate(self, model, rows, batch_size=16, progress=False, reduce=None):
        self.share_prefix(model, rows)
        try:
            return super().evaluate(model, rows, batch_size, progress, reduce)
        finally:
            self._shared = None

    def eval_sums(self, model, rows, batch_size, progress):
        """The cross-entropy sum and the confusion counts, row-major ([true label][predicted label])."""
        L = len(self.labels)
        confusion = [0] * (L * L)
        ce_total = 0.0
        for batch in self._batches(rows, batch_size, progress, "eval"):
            targets = [self.label_of(r) for r in batch]
            scores = self.scores(model, batch)
            ce = F.cross_entropy(scores, torch.tensor(targets, dtype=torch.long, device=scores.device),
                                 reduction="none")
            ce_total += float(ce.double().sum())
            for t, p in zip(targets, self.predict(scores)):
                confusion[t * L + p] += 1
        return {"ce": ce_total, "confusion": confusion, "n": len(rows)}

    def summarize(self, sums):
        L, n = len(self.labels), sums["n"]
        confusion = [sums["confusion"][t * L: (t + 1) * L] for t in range(L)]
        per_class = {}
        for i, label in enumerate(self.labels):
            c = {"n": sum(confusion[i]), "correct": confusion[i][i], "predicted": sum(row[i] for row in confusion)}
            # precision of a never-predicted label (recall of an absent one) is 0/0: None
            c["precision"] = c["correct"] / c["predicted"] if c["predicted"] else None
            c["recall"] = c["correct"] / c["n"] if c["n"] else None
            per_class[label] = c
        correct = sum(confusion[i][i] for i in range(L))
        return {"accuracy": correct / n, "n": n, "correct": correct, "per_class": per_class, "loss": sums["ce"] / n,
                "confusion": {"labels": list(self.labels), "matrix": confusion}}


# ---- multiple choice ------------------------------------------------------------------------------------------------

def _pair_logprobs(task: Task, model, prompts: list[list[int]], conts: list[list[int]]) -> list[torch.Tensor]:
    """For each (prompt, continuation) pair, the fp32 log-probs of the continuation's tokens after the prompt.

    One right-padded forward over prompt+continuation; the logit predicting continuation token k sits at
    len(prompt) - 1 + k. Gathering a fixed-width axis (short continuations repeat a position with weight 0) keeps
    the sums free of atomics, as in ClassificationTask._scores_general."""
    device = _device(model)
    seqs = [p + c for p, c in zip(prompts, conts)]
    ids, mask = _right_pad(seqs, task.pad_id, device)
    width = max(len(c) for c in conts)
    pos = [[len(p) - 1 + min(k, len(c) - 1) for k in range(width)] for p, c in zip(prompts, conts)]
    tok = [[c[min(k, len(c) - 1)] for k in range(width)] for c in conts]
    logits, _ = task._logits(model, ids, mask)
    pos = torch.tensor(pos, dtype=torch.long, device=logits.device)
    pair = torch.arange(len(seqs), device=logits.device)[:, None]
    logp = torch.log_softmax(logits[pair, pos].float(), dim=-1)  # (pairs, width, V) in fp32
    token_logp = logp.gather(2, torch.tensor(tok, dtype=torch.long, device=logp.device)[..., None])[..., 0]
    return [token_logp[i, : len(c)] for i, c in enumerate(conts)]


class MultipleChoiceTask(Task):
    """Multiple choice: each row has a context (formatted by the template), candidate completions (`choices`, a
    list) and the right one (`answer`: its index or its text). score(choice) = sum (`score = "sum"`) or mean
    (`"mean"`, length-normalised) of log p(choice tokens | prompt); loss = cross-entropy of softmax(scores) against
    the answer; prediction = argmax (ties go to the first choice)."""

    objectives = ("cross_entropy", "accuracy")

    def __init__(self, tokenizer, max_length: int, template: str = "{context}", score: str = "sum",
                 answer_prefix: str = " "):
        super().__init__(tokenizer, max_length, template)
        if score not in ("sum", "mean"):
            raise ValueError(f"score must be 'sum' or 'mean', got {score!r}")
        self.score = score
        self.answer_prefix = answer_prefix
        self.required_fields = tuple(self.template_fields) + tuple(
            f for f in ("choices", "answer") if f not in self.template_fields)

    @staticmethod
    def choices_of(row: dict) -> list[str]:
        choices = row["choices"]
        if isinstance(choices, str):  # a CSV cell holding a JSON array
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                raise DataError(f"choices {choices!r} is not a list (in a CSV file, write a JSON array: "
                                f"[\"a\", \"b\"])") from None
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"choices must be a list of at least 2 non-empty strings, got {row['choices']!r}")
        return choices

    def answer_of(self, row: dict) -> int:
        choices = self.choices_of(row)
        answer = row["answer"]
        if isinstance(answer, str) and answer.strip().isdigit() and answer not in choices:
            answer = int(answer)  # a CSV cell "1"
        if isinstance(answer, int) and not isinstance(answer, bool):
            if 0 <= answer < len(choices):
                return answer
            raise DataError(f"answer {answer} is not an index into the {len(choices)} choices")
        if isinstance(answer, str) and answer in choices:
            return choices.index(answer)
        raise DataError(f"answer {answer!r} is neither a choice index nor one of the choices")

    def _check_row(self, row, where, errors):
        if not self._check_template(row, where, errors):
            return
        missing = [f for f in ("choices", "answer") if f not in row]
        if missing:
            errors.add(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                       + ", ".join(repr(f) for f in missing))
            return
        try:
            self.answer_of(row)
        except DataError as e:
            errors.add(f"{where}: {e}")

    def demonstration(self, row):
        return self.template.format(**row) + self.answer_prefix + self.choices_of(row)[self.answer_of(row)]

    def _pairs(self, row: dict) -> tuple[list[int], list[list[int]]]:
        """(prompt ids cut from the left, token ids of each choice) so that prompt + longest choice fits."""
        conts = [list(self.tokenizer(self.answer_prefix + c, add_special_tokens=False).input_ids)[: self.max_length - 1]
                 for c in self.choices_of(row)]
        if not all(conts):
            raise DataError(f"a choice of {row['choices']!r} tokenizes to no tokens")
        prompt = list(self.tokenizer(self.format(row), add_special_tokens=True).input_ids)
        room = self.max_length - max(len(c) for c in conts)
        return prompt[-room:] if len(prompt) > room else prompt, conts

    def scores(self, model, rows: Sequence[dict]) -> list[torch.Tensor]:
        """Per row, an fp32 tensor of its choices' scores (rows may have different numbers of choices)."""
        prompts, conts, owner = [], [], []
        for i, row in enumerate(rows):
            prompt, cs = self._pairs(row)
            for c in cs:
                prompts.append(prompt)
                conts.append(c)
                owner.append(i)
        logps = _pair_logprobs(self, model, prompts, conts)
        per_pair = [lp.sum() if self.score == "sum" else lp.mean() for lp in logps]
        out: list[list[torch.Tensor]] = [[] for _ in rows]
        for i, v in zip(owner, per_pair):
            out[i].append(v)
        return [torch.stack(v) for v in out]

    def loss_terms(self, model, rows):
        ce = torch.stack([F.cross_entropy(s[None], torch.tensor([self.answer_of(r)], device=s.device))
                          for s, r in zip(self.scores(model, rows), rows)])
        return ce, torch.ones_like(ce)

    def metric_terms(self, model, rows):
        return torch.tensor([float(ClassificationTask.predict(s[None])[0] == self.answer_of(r))
                             for s, r in zip(self.scores(model, rows), rows)], dtype=torch.float32)

    def eval_sums(self, model, rows, batch_size, progress):
        correct, ce_total = 0, 0.0
        for batch in self._batches(rows, batch_size, progress, "eval"):
            for s, r in zip(self.scores(model, batch), batch):
                t = self.answer_of(r)
                ce_total += float(F.cross_entropy(s[None].double(), torch.tensor([t], device=s.device)))
                correct += ClassificationTask.predict(s[None])[0] == t
        return {"correct": int(correct), "ce": ce_total, "n": len(rows)}

    def summarize(self, sums):
        n = sums["n"]
        return {"accuracy": sums["correct"] / n, "n": n, "correct": sums["correct"], "loss": sums["ce"] / n}


# ---- generation ----------------------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1: the best over gold answers of the F1 of the normalised tokens' multiset overlap."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            f1 = float(pred == gold)
        else:
            common = sum((Counter(pred) & Counter(gold)).values())
            if common == 0:
                f1 = 0.0
            else:
                precision, recall = common / len(pred), common / len(gold)
                f1 = 2 * precision * recall / (precision + recall)
        best = max(best, f1)
    return best


class GenerationTask(Task):
    """Generation: the template formats the context; the row's `answers` (a list, or SQuAD's {"text": [...]}) or
    `answer` (a string) are the gold answers. Training: cross-entropy on the first answer's tokens (then eos) after
    the prompt, the prompt itself unscored. Evaluation: greedy decoding of up to `max_new_tokens`, cut at the first
    `stop` string; SQuAD exact match and token F1 against the best-matching gold answer."""

    objectives = ("cross_entropy", "accuracy", "f1")

    def __init__(self, tokenizer, max_length: int, template: str = "{context}", max_new_tokens: int = 32,
                 stop: Sequence[str] = ("\n",), answer_prefix: str = " "):
        super().__init__(tokenizer, max_length, template)
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens < max_length:
            raise ValueError(f"max_new_tokens must be an integer in [1, max_length), got {max_new_tokens!r}")
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.answer_prefix = answer_prefix
        self.eos_id = tokenizer.eos_token_id
        self.required_fields = tuple(self.template_fields)

    @staticmethod
    def answers_of(row: dict) -> list[str]:
        if "answers" in row:
            answers = row["answers"]
            if isinstance(answers, dict) and "text" in answers:  # the Hugging Face squad layout
                answers = answers["text"]
            if isinstance(answers, str):
                answers = [answers]
        elif "answer" in row:
            answers = [row["answer"]]
        else:
            raise DataError("missing field 'answers' (a list) or 'answer' (a string)")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"answers must be a non-empty list of strings, got {answers!r}")
        return answers

    def _check_row(self, row, where, errors):
        if not self._check_template(row, where, errors):
            return
        try:
            self.answers_of(row)
        except DataError as e:
            errors.add(f"{where}: {e}")

    def demonstration(self, row):
        return self.template.format(**row) + self.answer_prefix + self.answers_of(row)[0]

    def prompt_ids(self, row: dict, room: int) -> list[int]:
        ids = list(self.tokenizer(self.format(row), add_special_tokens=True).input_ids)
        return ids[-room:] if len(ids) > room else ids

    def target_ids(self, row: dict) -> list[int]:
        ids = list(self.tokenizer(self.answer_prefix + self.answers_of(row)[0], add_special_tokens=False).input_ids)
        if self.eos_id is not None:
            ids.append(int(self.eos_id))
        return ids[: self.max_length - 1]

    def loss_terms(self, model, rows):
        targets = [self.target_ids(r) for r in rows]
        prompts = [self.prompt_ids(r, self.max_length - len(t)) for r, t in zip(rows, targets)]
        logps = _pair_logprobs(self, model, prompts, targets)
        sums = torch.stack([-lp.sum() for lp in logps])
        return sums, torch.tensor([float(len(t)) for t in targets], device=sums.device)

    def generate(self, model, rows: Sequence[dict]) -> list[str]:
        """Greedy completions, one row at a time (no padding to get wrong), cut at the first stop string."""
        device = _device(model)
        out = []
        for row in rows:
            ids = torch.tensor([self.prompt_ids(row, self.max_length - self.max_new_tokens)], device=device)
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                     eos_token_id=self.eos_id)
            text = self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            cuts = [text.index(s) for s in self.stop if s and s in text]
            out.append((text[: min(cuts)] if cuts else text).strip())
        return out

    def metric_terms(self, model, rows):
        metric = token_f1 if self.objective == "f1" else exact_match
        return torch.tensor([metric(p, self.answers_of(r)) for p, r in zip(self.generate(model, rows), rows)],
                            dtype=torch.float32)

    def eval_sums(self, model, rows, batch_size, progress):
        em = f1 = nll = 0.0
        tokens = 0
        for batch in self._batches(rows, batch_size, progress, "eval"):
            sums, counts = self.loss_terms(model, batch)
            nll += float(sums.double().sum())
            tokens += int(counts.sum())
            for p, r in zip(self.generate(model, batch), batch):
                em += exact_match(p, self.answers_of(r))
                f1 += token_f1(p, self.answers_of(r))
        return {"em": em, "f1": f1, "nll": nll, "tokens": tokens, "n": len(rows)}

    def summarize(self, sums):
        n = sums["n"]
        return {"exact_match": sums["em"] / n, "f1": sums["f1"] / n, "n": n, "loss": sums["nll"] / sums["tokens"]}


def build_task(task_cfg, tokenizer, max_length: int) -> Task:
    """The task a recipe's [task] table describes: `type` ("lm" | "classification" | "multiple_choice" |
    "generation"), `template`, `verbalizer`, `score`, `max_new_tokens`, `stop`, `answer_prefix`, `objective`."""
    kind = getattr(task_cfg, "type", None)
    default_template = "{context}" if kind in ("multiple_choice", "generation") else "{text}"
    template = getattr(task_cfg, "template", None) or default_template
    answer_prefix = getattr(task_cfg, "answer_prefix", " ")
    if kind == "lm":
        task = LMTask(tokenizer, max_length, template)
    elif kind == "classification":
        task = ClassificationTask(tokenizer, max_length, getattr(task_cfg, "verbalizer", None), template)
    elif kind == "multiple_choice":
        task = MultipleChoiceTask(tokenizer, max_length, template, getattr(task_cfg, "score", "sum"), answer_prefix)
    elif kind == "generation":
        task = GenerationTask(tokenizer, max_length, template, getattr(task_cfg, "max_new_tokens", 32),
                              getattr(task_cfg, "stop", ("\n",)), answer_prefix)
    else:
        raise ValueError(f"unknown task type {kind!r}; expected 'lm', 'classification', 'multiple_choice' "
                         f"or 'generation'")
    task.set_objective(getattr(task_cfg, "objective", "cross_entropy"))
    return task
