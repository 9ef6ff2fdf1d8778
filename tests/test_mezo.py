"""Contracts 1, 3 and 4 on tiny real models: the trainable set, untouched weights, the update."""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from conftest import ARCHS, build_model
from mezo_tune import cpu_kernels, mezo, zrng

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def batch(seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (3, 12), generator=g)


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_set_has_tied_weights_once(arch):
    model = build_model(arch, tie=True)
    ts = mezo.trainable_set(model)
    assert len(ts.names) == len(set(ts.names))
    ptrs = [p.data_ptr() for p in ts.params]
    assert len(ptrs) == len(set(ptrs))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert ts.numel == sum(p.numel() for p in model.parameters())


def test_freeze_patterns():
    model = build_model("llama")
    ts = mezo.trainable_set(model, freeze=["*norm*", "model.embed_tokens.weight"])
    assert not any("norm" in n for n in ts.names) and "model.embed_tokens.weight" not in ts.names
    with pytest.raises(ValueError, match="nothing to train"):
        mezo.trainable_set(model, freeze=["*"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("small, alone, families", [(None, True, True), (0, True, True), (64, True, True),
                                                    (0, True, False), (0, False, False)],
                         ids=["small-default", "none-early", "norms-early", "none-early-no-families",
                              "none-early-data-swaps"])
def test_perturbed_forward_equals_functional_call_and_leaves_weights(arch, dtype, small, alone, families):
    """The hooks compute exactly loss(θ ± εz), and no stored bit changes. (Every weight through the hooks: 16-bit
    linears go by row blocks by default, whose matmuls may round differently on another CPU; tested below.) Small
    tensors are swapped in for the whole forward (Mezo._hooked_by): all of this tiny model's but the embedding tables
    by default, none, or the norms and biases alone (the linears swapped around their calls). A module that alone
    owns its tensors takes their perturbed copies in its parameter dict (ALONE), else through the Parameters' data;
    such modules with one parent are swapped around the parent's call (FAMILIES), or each around its own."""
    model = build_model(arch, dtype)
    ts = mezo.trainable_set(model)
    engine = mezo.Mezo(model, ts, seed=7, eps=1e-2, large_linear=1 << 62)
    engine.ALONE, engine.FAMILIES = alone, families
    if small is not None:
        engine.SMALL_TENSOR = small
    early = engine._hooked_by(frozenset(ts.names))[1][0]
    if small is None:
        assert len(early) == len(ts.names) - len(engine._embeddings)  # (tied: the LM head's weight is a table's)
    else:  # those of modules whose tensors are all small (a linear's bias goes with its weight)
        assert all(p.numel() <= small for _, p in early) and bool(early) == bool(small)
    if small == 0:  # e.g. each attention's projections: one family
        assert all(len(members) > 1 for _, members, _ in engine._hooked_by(frozenset(ts.names))[2])
        assert len(engine._hooked_by(frozenset(ts.names))[2]) >= 4
    ids = batch()
    before = snapshot(model)
    for sign in (+1, -1):
        with torch.no_grad(), engine.perturbed(3, sign):
            hooked = lm_loss(model, ids)
        perturbed = {}
        for name, p in zip(ts.names, ts.params):
            z = zrng.z_for(7, 3, name, p.numel()).view(p.shape)
            perturbed[name] = (p.float() + torch.tensor(sign * 1e-2, dtype=torch.float32) * z).to(dtype)
        with torch.no_grad():
            reference = lm_loss_functional(model, perturbed, ids)
        assert hooked.item() == reference.item()
        assert hooked.item() != lm_loss(model, ids).item()
    assert_bit_equal(before, snapshot(model))


def lm_loss_functional(model, params, ids):
    logits = functional_call(model, params, (), {"input_ids": ids}, tie_weights=True).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_with_zero_lr_changes_no_bit(dtype):
    model = build_model("llama", dtype)
    engine = mezo.Mezo(model, mezo.trainable_set(model), seed=1, eps=1e-3)
    before = snapshot(model)
    (rec,) = engine.step(0, 0.0, lambda: lm_loss(model, batch()))
    assert math.isfinite(rec["g"]) and rec["g"] != 0
    assert_bit_equal(before, snapshot(model))


def test_a_linear_that_raises_puts_its_parameters_back(monkeypatch):
    """A module that alone owns its tensors has their perturbed copies in its parameter dict for its call (Mezo.ALONE):
    when its forward raises, the Parameters are back in their places and no stored bit has changed."""
    model = build_model("llama")
    ts = mezo.trainable_set(model)
    engine = mezo.Mezo(model, ts, seed=1, eps=1e-1, large_linear=1 << 62)
    engine.SMALL_TENSOR = 0  # the linears around their calls (this tiny model's are all small)
    target = model.model.layers[1].mlp.down_proj
    assert engine._hooked_by(frozenset(ts.names))[0][id(target)][2]  # alone
    plain, seen = torch.nn.Linear.forward, []

    def forward(self, x):
        if self is target:
            seen.append(self.weight)
            raise RuntimeError("boom")
        return plain(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", forward)
    params = {m: dict(m._parameters) for m in model.modules()}
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), engine.perturbed(0, +1):
            lm_loss(model, batch())
    assert seen and not isinstance(seen[0], torch.nn.Parameter)  # it ran with the perturbed copy
    assert all(m._parameters[k] is p for m, ps in params.items() for k, p in ps.items())
    assert_bit_equal(before, snapshot(model))


def test_forward_that_raises_leaves_weights_restored():
    model = build_model("llama")
    engine = mezo.Mezo(model, mezo.trainable_set(model), seed=1, eps=1e-1)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), engine.perturbed(0, +1):
            model.model.embed_tokens(batch())  # perturbs and restores the embedding
            model.model.layers[0].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            model(input_ids=batch())
    assert_bit_equal(before, snapshot(model))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("distribution", zrng.DISTRIBUTIONS)
def test_update_is_the_documented_formula(dtype, distribution):
    """θ_new = R(θ - c·z) with c = fp32(η·g), product exact in fp64, then nearest-even to fp32 and to the dtype."""
    model = build_model("gpt2", dtype)
    ts = mezo.trainable_set(model)
    engine = mezo.Mezo(model, ts, seed=3, eps=1e-3, distribution=distribution)
    before = [p.detach().clone() for p in ts.params]
    c = mezo.update_scale(1e-3, 0.37)
    engine.apply_update(11, c)
    for name, p, old in zip(ts.names, ts.params, before):
        z = zrng.z_for(3, 11, name, p.numel(), distribution, dtype=torch.float64).view(p.shape)
        expected = (old.double() - c * z).float().to(dtype)
        assert torch.equal(p.detach(), expected), name


def test_update_compiled_equals_eager():
    pytest.importorskip("torch._inductor")
    results = []
    for use_compile in (False, True):
        model = build_model("llama", torch.bfloat16)
        engine = mezo.Mezo(model, mezo.trainable_set(model), seed=5, eps=1e-3, rounding="stochastic",
                           use_compile=use_compile)
        engine.apply_update(2, mezo.update_scale(1e-2, -1.5))
        with torch.no_grad(), engine.perturbed(4, -1):
            loss = lm_loss(model, batch())
        results.append((snapshot(model), loss.item()))
    assert_bit_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_stochastic_rounding_is_unbiased_and_deterministic(dtype):
    w0 = (torch.linspace(-1, 1, 200_000) * 0.05).to(dtype)
    c = torch.tensor(mezo.update_scale(1e-4, 0.3), dtype=torch.float64)
    key = zrng.key_tensor(*zrng.stream_key(0, 0, "w"))
    rkey = zrng.key_tensor(*zrng.stream_key(0, 0, "w", zrng.ROUNDING_STREAM))
    exact = w0.double() - c * zrng.z_for(0, 0, "w", w0.numel(), dtype=torch.float64)
    a, b, n = w0.clone(), w0.clone(), w0.clone()
    zrng.update_kernel_stochastic(a, key, rkey, c, "gaussian")
    zrng.update_kernel_stochastic(b, key, rkey, c, "gaussian")
    zrng.update_kernel(n, key, c, "gaussian")
    assert torch.equal(a, b)
    ulp_err_sr = (a.double() - exact).mean().abs().item()
    ulp_err_nearest = (n.double() - exact).abs().mean().item()
    assert ulp_err_sr < ulp_err_nearest / 20  # unbiased: the mean error vanishes, nearest's magnitude does not
    # where it differs from nearest, the result is the neighbour on the other side of the exact value
    differ = a != n
    assert differ.any()
    assert ((a.double() - exact)[differ] * (n.double() - exact)[differ] <= 0).all()


def test_nonfinite_loss_skips_step():
    model = build_model("llama")
    engine = mezo.Mezo(model, mezo.trainable_set(model), seed=1, eps=1e-3)
    before = snapshot(model)
    (rec,) = engine.step(0, 1.0, lambda: torch.tensor(float("nan")))
    assert rec["skipped"] and math.isnan(rec["g"])
    assert_bit_equal(before, snapshot(model))


def test_scalars():
    assert mezo.projected_gradient(2.5, 2.0, 0.25) == 1.0
    assert math.isnan(mezo.projected_gradient(float("inf"), 2.0, 1e-3))
    assert mezo.update_scale(1e-6, 3.0) == float(np.float32(np.float32(1e-6) * np.float32(3.0)))
    assert mezo.learning_rate(0, 1e-3, 11, "linear", 0.0) == float(np.float32(1e-3))
    assert mezo.learning_rate(10, 1e-3, 11, "linear", 0.0) == 0.0
    assert mezo.learning_rate(5, 1e-3, 11, "linear", 0.0) == float(np.float32(5e-4))
    assert mezo.learning_rate(7, 1e-3, 11, "constant") == float(np.float32(1e-3))


def test_large_linear_block_rows():
    """Blocks of a large Linear on CPU: a power of two of rows within 2 MiB (a block the matmul reads back from cache),
    within 4 MiB for a matmul of up to SMALL_MATMUL_TOKENS tokens (which reads it about once); a block size in elements
    when linear_block_elements is set."""
    model = build_model("llama")
    engine = mezo.Mezo(model, mezo.trainable_set(model), seed=0, eps=1e-3)
    rows = {(width, dtype): engine._block_rows(torch.empty(0, width, dtype=dtype))
            for width in (576, 4096, 100_000) for dtype in (torch.float32, torch.bfloat16)}
    assert rows == {(576, torch.float32): 512, (576, torch.bfloat16): 1024, (4096, torch.float32): 128,
                    (4096, torch.bfloat16): 256, (100_000, torch.float32): 16, (100_000, torch.bfloat16): 16}
    assert rows == {key: engine._block_rows(torch.empty(0, key[0], dtype=key[1]), 65) for key in rows}
    few = {(width, dtype): engine._block_rows(torch.empty(0, width, dtype=dtype), 64)
           for width in (576, 4096) for dtype in (torch.float32, torch.bfloat16)}
    assert few == {(576, torch.float32): 1024, (576, torch.bfloat16): 2048, (4096, torch.float32): 256,
                   (4096, torch.bfloat16): 512}
    engine.linear_block_elements = 576 * 7 + 5
    assert engine._block_rows(torch.empty(0, 576)) == 7


@pytest.mark.parametrize("tie", (True, False))
def test_large_linear_in_row_blocks_equals_whole_perturbed_weight(tie):
    """The LM head perturbed and applied in blocks of rows computes loss(θ + εz) (to matmul rounding); weights
    untouched; the scratch never holds the whole perturbed head."""
    model = build_model("llama", tie=tie)
    ts = mezo.trainable_set(model)
    engine = mezo.Mezo(model, ts, seed=7, eps=1e-2, large_linear=1)  # every trainable Linear goes by blocks
    engine.linear_block_elements = 32 * 7  # 7 rows per block: blocks do not divide 320 rows evenly
    ids = batch()
    before = snapshot(model)
    with torch.no_grad(), engine.perturbed(3, +1):
        blocked = lm_loss(model, ids)
    perturbed = {name: (p.float() + torch.tensor(1e-2) * zrng.z_for(7, 3, name, p.numel()).view(p.shape))
                 for name, p in zip(ts.names, ts.params)}
    with torch.no_grad():
        reference = lm_loss_functional(model, perturbed, ids)
    assert torch.allclose(blocked, reference, rtol=1e-6, atol=0)
    assert_bit_equal(before, snapshot(model))
    assert "forward" not in model.lm_head.__dict__  # the class forward is back
    assert max(b.numel() for pool in engine._scratch.values() for b in pool) < model.lm_head.weight.numel()


def test_blocks_formed_in_turn_into_several_buffers():
    """On CPU, for a matmul of more than SMALL_MATMUL_TOKENS tokens, a blocked linear's blocks go in turn into
    BLOCK_BUFFERS buffers: the same loss, bit for bit, as with one buffer, and that many block buffers kept."""
    model = build_model("llama", tie=True)
    ts = mezo.trainable_set(model)
    losses = []
    for buffers in (1, 3):
        engine = mezo.Mezo(model, ts, seed=7, eps=1e-2, large_linear=1)
        engine.linear_block_elements = 32 * 7
        engine.BLOCK_BUFFERS, engine.SMALL_MATMUL_TOKENS = buffers, 0
        with torch.no_grad(), engine.perturbed(3, +1):
            losses.append(lm_loss(model, batch()))
        assert len(engine._scratch[(torch.float32, torch.device("cpu"), (7, 32))]) == buffers
    assert torch.equal(losses[0], losses[1])


def test_perturbed_copies_streamed_from_stream_tokens_give_the_same_bits(monkeypatch):
    """From STREAM_TOKENS tokens in a module's input, its perturbed copies (a family's, a blocked linear's blocks) are
    formed with streaming stores (cpu_kernels' STREAMING; bf16 with AVX512-BF16, plain stores elsewhere): the same
    losses and the same updated weights, bit for bit, as with plain stores, with an update pending (the fused pass) and
    without; the flag goes to the C calls from that many tokens on and not below (36 tokens: streamed at a threshold
    of 36, not at 37)."""
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler")
    calls = []
    real_list, real_whole = cpu_kernels.form_list, cpu_kernels.perturb_whole

    def form_list(lib, items, eps, c, kind, distribution, stream=False):
        calls.append(("list", bool(stream)))
        return real_list(lib, items, eps, c, kind, distribution, stream)

    def perturb_whole(lib, out, w, key, eps, distribution, ukey=None, c=0.0, stream=False):
        calls.append(("block", bool(stream)))
        return real_whole(lib, out, w, key, eps, distribution, ukey, c, stream)

    monkeypatch.setattr(cpu_kernels, "form_list", form_list)
    monkeypatch.setattr(cpu_kernels, "perturb_whole", perturb_whole)
    ids = batch()  # 3 x 12 = 36 tokens
    results = {}
    for threshold in (36, 37):
        model = build_model("llama", torch.bfloat16, tie=True)
        ts = mezo.trainable_set(model)
        engine = mezo.Mezo(model, ts, seed=7, eps=1e-2, distribution="rademacher32", use_compile=True,
                           large_linear=320 * 32)
        engine.STREAM_TOKENS, engine.defer_updates = threshold, True
        engine.SMALL_TENSOR = 0  # no early swaps: the decoder layers' linears go as families (_hooked_by)
        assert engine._large_linears, "the tied head goes by blocks"
        calls.clear()
        records = [engine.step(s, 1e-2, lambda: lm_loss(model, ids)) for s in range(3)]
        engine.flush()
        results[threshold] = (records, snapshot(model))
        # from the threshold on: the families' calls and the head's blocks streamed (the norms, alone in their own
        # modules' calls, are too); below it: none
        assert {stream for kind, stream in calls if kind == "block"} == {threshold <= 36}, (threshold, calls)
        assert {stream for kind, stream in calls if kind == "list"} == {threshold <= 36}, (threshold, calls)
    assert results[36][0] == results[37][0]
    assert_bit_equal(results[36][1], results[37][1])


@pytest.mark.parametrize("use_compile", (False, True))
def test_a_linear_with_a_bias_in_row_blocks(use_compile):
    """A blocked linear with a bias: each block's columns get x·(W + εz_W)ᵀ + (b + εz_b), the bias perturbed by the
    swap around the blocked forward; the weights are left as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 50))
    ts = mezo.trainable_set(model)
    engine = mezo.Mezo(model, ts, seed=4, eps=1e-2, large_linear=1, use_compile=use_compile)
    engine.linear_block_elements = 32 * 7
    x = torch.randn(3, 5, 32)
    before = snapshot(model)
    with torch.no_grad(), engine.perturbed(2, -1):
        blocked = model(x)
    w, b = (p - 1e-2 * zrng.z_for(4, 2, n, p.numel()).view(p.shape) for n, p in zip(ts.names, ts.params))
    torch.testing.assert_close(blocked, torch.nn.functional.linear(x, w, b), rtol=1e-6, atol=1e-6)
    assert_bit_equal(before, snapshot(model))


def test_only_large_linears_go_by_blocks_in_every_dtype():
    """mezo.BLOCKED_LINEAR_ELEMENTS: an nn.Linear of 8M elements or more (an LM head) is perturbed in row blocks, the
    smaller ones whole through the swap hooks, in fp32 and in 16 bits; both give the same forward."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = build_model("llama").to(dtype)
        engine = mezo.Mezo(model, mezo.trainable_set(model), seed=0, eps=1e-3)
        assert engine._large_linears == [], dtype
        blocked = mezo.Mezo(model, mezo.trainable_set(model), seed=0, eps=1e-3, large_linear=0)
        assert len(blocked._large_linears) == sum(type(m) is torch.nn.Linear for m in model.modules())
        with torch.no_grad():
            with engine.perturbed(5, -1):
                by_default = lm_loss(model, batch())
            with blocked.perturbed(5, -1):
                by_blocks = lm_loss(model, batch())
        # the same math; a blocked matmul may round differently from a whole one on another CPU's kernels
        torch.testing.assert_close(by_default, by_blocks, rtol=1e-3, atol=0)
    assert mezo.BLOCKED_LINEAR_ELEMENTS == 1 << 23


def _deferred_pair(dtype, tie, distribution, large_linear=None, device="cpu", **kw):
    """Two engines on two copies of one model: updates applied at once, and left pending (defer_updates)."""
    engines = []
    for defer in (False, True):
        model = build_model("llama", dtype, tie=tie).to(device)
        engine = mezo.Mezo(model, mezo.trainable_set(model), seed=3, eps=1e-2, distribution=distribution,
                           use_compile=True, large_linear=large_linear, **kw)
        engine.defer_updates = defer
        engines.append(engine)
    return engines


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("distribution", ("gaussian", "rademacher32"))
@pytest.mark.parametrize("tie, large_linear", [(True, None), (False, None), (True, 1), (False, 1)])
def test_deferred_updates_run_the_same_steps(dtype, distribution, tie, large_linear, monkeypatch):
    """An update left pending and fused into the next step's first perturbed forward (zrng.update_perturb) gives
    the same records, bit for bit, and after flush() the same weights as updates applied at once: tied and untied
    heads, every linear in row blocks or none (those and the embedding are updated before their first use), SGD and
    momentum (several updates per record: the last one is left pending)."""
    fused, flushed = [], set()
    real, real_flush = zrng.update_perturb, mezo.Mezo.flush
    monkeypatch.setattr(zrng, "update_perturb", lambda *a: fused.append(a[0].numel()) or real(*a))
    real_list = cpu_kernels.form_list  # the hot path's C call (Mezo._form_list): fused where given a ukey
    monkeypatch.setattr(cpu_kernels, "form_list", lambda lib, items, *a: fused.extend(
        items[i + 2] for i in range(0, len(items), 5) if items[i + 4]) or real_list(lib, items, *a))

    def flush(self, names=None):  # what a pending update leaves to a pass of its own
        if self._pending is not None:
            flushed.update(self._pending.names if names is None else self._pending.names & set(names))
        real_flush(self, names)

    monkeypatch.setattr(mezo.Mezo, "flush", flush)
    for rule in (mezo.UpdateRule(), mezo.UpdateRule(0.5, 3)):
        now, later = _deferred_pair(dtype, tie, distribution, large_linear, rule=rule)
        for engine in (now, later):
            engine.linear_block_elements = 32 * 7
            if tie:  # the norms swapped in for the whole forward, the linears around their calls (default: all)
                engine.SMALL_TENSOR = 64
        for t in range(4):
            loss = [lambda e=e: lm_loss(e.model, batch(t)) for e in (now, later)]
            records = [e.step(t, 1e-2, f) for e, f in zip((now, later), loss)]
            assert repr(records[0]) == repr(records[1]) and not records[0][0]["skipped"]  # repr: exact floats
            assert now._pending is None and later._pending is not None
        if rule.window == 1:  # (momentum: a record's updates but the last are applied at once, by a flush)
            # every tensor took the fused pass (whole, or a blocked head block by block; a tied embedding's lookup
            # updates its rows alone), but an untied embedding, updated at the context's exit
            assert flushed == (set() if tie else {"model.embed_tokens.weight"})
        assert later.digest() == now.digest() and later._pending is None  # digest flushes
        assert_bit_equal(snapshot(now.model), snapshot(later.model))
        assert fused  # some tensors took the fused pass
        fused.clear()
        flushed.clear()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tie", (True, False))
def test_blocked_linears_on_the_hot_path_are_the_general_path(dtype, tie, monkeypatch):
    """A blocked linear's blocks formed by the C kernels directly (Mezo._block_former: the keys' addresses made once
    a step, one call a block, the pending update fused in order) give the general path's bits: the same logits in
    each perturbed forward, the same records, the same weights; the hot path ran (the general one never calls
    perturb_whole), the update fused into each block of the head in the first forward after each step."""
    calls = []
    real = cpu_kernels.perturb_whole
    monkeypatch.setattr(cpu_kernels, "perturb_whole", lambda *a, **k: calls.append(len(a) > 6) or real(*a, **k))

    def engine():
        model = build_model("llama", dtype, tie=tie)
        e = mezo.Mezo(model, mezo.trainable_set(model), seed=3, eps=1e-2, distribution="rademacher32",
                      use_compile=True, large_linear=1)  # every linear by blocks
        e.defer_updates = True
        e.linear_block_elements = 32 * 7  # 7 rows a block: 46 blocks of the 320-row head, the last one short
        return e

    hot, general = engine(), engine()
    general._block_former = lambda *a: None
    runs = [[], []]
    for e, out in zip((hot, general), runs):
        for t in range(3):
            ids = batch(t)
            rec = e.step(t, 1e-2, lambda: lm_loss(e.model, ids))
            with torch.no_grad(), e.perturbed(t + 1, -1):  # fuses step t's update
                out.append((rec, e.model(ids).logits))
        e.flush()
    for (r0, l0), (r1, l1) in zip(*runs):
        assert repr(r0) == repr(r1)
        assert torch.equal(l0, l1)
    assert_bit_equal(snapshot(hot.model), snapshot(general.model))
    assert calls.count(True) >= 3 * -(-320 // 7) and calls.count(False) > 0  # fused in each step's first forward


class _Pair(torch.nn.Module):
    """Two linears, a family; with `inner`, a second family of the same shapes called between them."""

    def __init__(self, dtype, inner=None):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 32, dtype=dtype), torch.nn.Linear(32, 32, dtype=dtype)
        self.inner = inner

    def forward(self, x):
        x = torch.tanh(self.a(x))
        return self.b(torch.tanh(x if self.inner is None else self.inner(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_family_calls_are_the_calls_made_each_time(dtype):
    """A family's hot-path call made once and kept (Mezo._plan_for: buffers of its own, item arrays by key table
    slot) gives the bits of the call made afresh each time: the same records and weights over steps with an update
    left pending, for a decoder's families and for a family called inside another of its shapes (whose buffers are
    then in use: it takes the pool's); a tensor whose storage moved gets a new plan, and the same bits."""
    def engines(build):
        out = []
        for plans in (True, False):
            torch.manual_seed(0)
            model = build()
            e = mezo.Mezo(model, mezo.trainable_set(model), seed=3, eps=1e-2, distribution="rademacher32",
                          use_compile=True)
            e.defer_updates, e.PLANS = True, plans
            e.SMALL_TENSOR = 64  # the linears swapped around their families' calls, not for the whole forward
            out.append(e)
        return out

    x = torch.randn(4, 32).to(dtype)
    cases = ((lambda: build_model("llama", dtype), lambda e, t: lm_loss(e.model, batch(t))),
             (lambda: _Pair(dtype, _Pair(dtype)), lambda e, t: e.model(x * (t + 1)).float().pow(2).mean()))
    for build, loss_of in cases:
        kept, fresh = engines(build)
        for t in range(4):
            if t == 2:  # a tensor's storage moves between steps
                for e in (kept, fresh):
                    w = next(p for n, p in e.model.named_parameters() if n.endswith("weight") and p.dim() == 2
                             and "embed" not in n and "lm_head" not in n)
                    w.data = w.data.clone()
            records = [e.step(t, 1e-2, lambda e=e: loss_of(e, t)) for e in (kept, fresh)]
            assert repr(records[0]) == repr(records[1]) and not records[0][0]["skipped"]
        plans = [p for entry in kept._hooked_cache.values() for p in entry[3].values() if p.bufs is not None]
        assert plans and all(len(p.calls) <= 4 for p in plans)  # (key slot, update slot): made once each
        assert all(p.ptrs == [q.data_ptr() for *_, q in p.alone] for p in plans)  # made again where storage moved
        assert not any(entry[3] for entry in fresh._hooked_cache.values())
        inner = kept._scratch[(dtype, torch.device("cpu"), (32, 32))]
        assert bool(inner) == isinstance(kept.model, _Pair)  # the inner family: the pool's buffers
        kept.flush(), fresh.flush()
        assert_bit_equal(snapshot(kept.model), snapshot(fresh.model))


class _Heads(torch.nn.Module):
    """Two linears in a ModuleList, which never runs: the module's forward calls them."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)])

    def forward(self, x):
        return self.heads[1](torch.tanh(self.heads[0](x)))


def test_a_container_that_never_runs_holds_no_family():
    """Modules whose parent has no forward (a ModuleList's items) are swapped around their own calls, not their
    parent's (which never comes: they would run unperturbed): the perturbed forward computes f(θ + εz)."""
    torch.manual_seed(0)
    model, x = _Heads(), torch.randn(4, 32)
    ts = mezo.trainable_set(model)
    engine = mezo.Mezo(model, ts, seed=3, eps=1e-2)
    engine.SMALL_TENSOR = 0  # not swapped for the whole forward
    assert engine._hooked_by(frozenset(ts.names))[2] == []
    with torch.no_grad(), engine.perturbed(0, +1):
        hooked = model(x)
    perturbed = {name: (p + torch.tensor(1e-2) * zrng.z_for(3, 0, name, p.numel()).view(p.shape))
                 for name, p in zip(ts.names, ts.params)}
    with torch.no_grad():
        assert_bit_equal({"out": hooked}, {"out": functional_call(model, perturbed, (x,))})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deferred_updates_on_cuda_run_the_same_steps(dtype):
    """On CUDA the fused pass is the Triton twin: the same records and weights as updates applied at once."""
    pytest.importorskip("triton")
    now, later = _deferred_pair(dtype, True, "rademacher32", device="cuda")
    for t in range(3):
        ids = batch(t).cuda()
        records = [e.step(t, 1e-2, lambda e=e: lm_loss(e.model, ids)) for e in (now, later)]
        assert repr(records[0]) == repr(records[1]) and later._pending is not None
    later.flush()
    assert_bit_equal(snapshot(now.model), snapshot(later.model))


def test_a_forward_that_raises_still_applies_the_pending_update():
    """A perturbed forward that raises part-way (some tensors updated by the fused pass, the rest not) leaves every
    tensor updated once: the context's exit applies what is left."""
    now, later = _deferred_pair(torch.float32, True, "rademacher32")
    for engine in (now, later):
        engine.step(0, 0.5, lambda e=engine: lm_loss(e.model, batch()))
    hook = later.model.model.layers[1].mlp.register_forward_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), later.perturbed(1, +1):
            lm_loss(later.model, batch())
    hook.remove()
    assert later._pending is None
    assert_bit_equal(snapshot(now.model), snapshot(later.model))


def test_a_forward_that_raises_inside_a_blocked_linear_applies_the_rest_of_its_update(monkeypatch):
    """A pending update fused block by block into a blocked linear, the forward raising after some of its blocks:
    the context's exit updates the rest of that tensor (from where the blocks stopped) and every other, once each."""
    now, later = _deferred_pair(torch.float32, True, "rademacher32", large_linear=1)
    for engine in (now, later):
        engine.linear_block_elements = 32 * 7
        engine.step(0, 0.5, lambda e=engine: lm_loss(e.model, batch()))
    calls, real_mm = [], torch.mm

    def mm(*args, **kwargs):  # the third block's matmul raises: two blocks of the first linear updated
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", mm)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), later.perturbed(1, +1):
            lm_loss(later.model, batch())
    monkeypatch.setattr(torch, "mm", real_mm)
    assert later._pending is None
    assert_bit_equal(snapshot(now.model), snapshot(later.model))


@pytest.mark.parametrize("what", ["stochastic rounding", "fzoo", "no C kernels", "adam"])
def test_updates_are_applied_at_once_where_they_cannot_be_fused(what):
    """defer_updates leaves nothing pending where the fused pass does not apply: stochastic rounding, the one-sided
    estimator (its first forward is unperturbed), torch kernels (use_compile off), an update rule of its own."""
    model = build_model("llama")
    kw = {"stochastic rounding": {"rounding": "stochastic"}, "fzoo": {"estimator": "fzoo"},
          "no C kernels": {}, "adam": {"rule": mezo.AdamRule()}}[what]
    engine = mezo.Mezo(model, mezo.trainable_set(model), seed=3, eps=1e-2, use_compile=what != "no C kernels", **kw)
    engine.defer_updates = True
    engine.step(0, 0.5, lambda: lm_loss(model, batch()), directions=2)
    assert engine._pending is None


@pytest.mark.parametrize("tie", [True, False])
def test_a_deferred_step_hashes_each_key_once(tie, monkeypatch):
    """A step's stream keys are hashed once per tensor, also when the update left pending by the step before is
    flushed between its forwards (an untied embedding's, at the first forward's exit): the keys of the two latest
    steps are kept, also after a step run out of order (bench's extra call for the peak: 9 here), which a cache
    that dropped the lower step kept for good (the step and its pending update then evicted each other)."""
    engine = _deferred_pair(torch.float32, tie, "rademacher32")[1]
    calls, real = [], zrng.stream_keys  # (stream_key hashes through it)
    monkeypatch.setattr(zrng, "stream_keys", lambda seed, step, names, *a: calls.extend(names)
                        or real(seed, step, names, *a))
    for t in (0, 1, 9, 2, 3, 4):
        calls.clear()
        engine.step(t, 1e-2, lambda: lm_loss(engine.model, batch(t % 4)))
        assert len(calls) == len(engine.trainable.names), t
