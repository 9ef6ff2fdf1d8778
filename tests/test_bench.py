"""`mezo-tune bench` on random Llama-shaped models built from configs (nothing downloaded): every variant runs in
its own process and reports; the replay figure counts the bytes of the trainable set; --sweep writes JSON and PNG."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch
from test_cli import cli

from mezo_tune.bench import format_bench, format_sweep, parse_shape, plot_sweep, random_llama, tensor_peak_bytes


def test_random_llama_shape():
    model = random_llama("config:64x2", "float32", "cpu")
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 1, 1)
    assert c.intermediate_size == 192 and c.vocab_size == 32000 and not c.tie_word_embeddings
    again = random_llama("config:64x2", "float32", "cpu")
    assert all((a == b).all() for a, b in zip(model.parameters(), again.parameters()))  # seeded: the same weights
    # key/value heads that divide the heads, about a quarter of them: SmolLM2's 576 wide takes 9 and 3 (and runs)
    shapes = {h: random_llama(f"config:{h}x1", "float32", "cpu").config for h in (320, 576, 640, 768)}
    assert {h: (c.num_attention_heads, c.num_key_value_heads) for h, c in shapes.items()} == {
        320: (5, 1), 576: (9, 3), 640: (10, 2), 768: (12, 3)}
    wide = random_llama("config:576x1", "float32", "cpu")
    assert wide(torch.ones(1, 4, dtype=torch.long)).logits.shape == (1, 4, 32000)


@pytest.mark.parametrize("bad", ["64", "64x", "60x2", "64x0", "axb"])
def test_bad_shapes_are_refused(bad):
    with pytest.raises(ValueError, match="HIDDENxLAYERS|multiple of 64"):
        parse_shape(bad)
    result = cli("bench", "--model", f"config:{bad}", ok=False)
    assert result.exit_code == 2 and "Error:" in result.output


def test_distribution_is_for_the_plain_bench_only():
    for extra in (["--sweep"], ["--nproc", "1"]):
        result = cli("bench", "--model", "config:64x2", "--distribution", "rademacher32", *extra, ok=False)
        assert result.exit_code == 2 and "--distribution" in result.output


def test_bench_runs_the_steps_with_the_distribution_asked_for():
    """--distribution reaches the MeZO and replay children (rademacher32: z generator v2's kernels)."""
    res = json.loads(cli("bench", "--model", "config:64x2", "--batch-size", 2, "--seq-len", 8, "--repeats", 1,
                         "--distribution", "rademacher32", "--json").stdout)
    assert res["distribution"] == "rademacher32" and res["replay_step_s"] > 0
    assert "z rademacher32" in format_bench(res).splitlines()[0]


def test_bench_reports_every_variant_and_the_replay_bandwidth():
    res = json.loads(cli("bench", "--model", "config:64x2", "--batch-size", 2, "--seq-len", 8, "--repeats", 1,
                         "--compile", "off", "--json").stdout)
    params = sum(p.numel() for p in random_llama("config:64x2", "float32", "cpu").parameters())
    assert res["replay_bytes_moved"] == 2 * 4 * params  # read and write every fp32 weight once
    assert set(res["ratios"]) == {"mezo_over_forward", "backprop_over_mezo", "reference_over_mezo",
                                  "mezo_peak_over_forward_peak", "backprop_peak_over_mezo_peak",
                                  "replay_bandwidth_fraction", "mezo_tensor_peak_over_forward",
                                  "backprop_tensor_peak_over_mezo"}
    assert all(v > 0 for v in res["ratios"].values()) and res["copy_bytes_per_s"] > 0
    # time ratios: each step variant in forwards timed between its calls, in its own process
    between = res["forward_between_calls_s"]
    assert res["ratios"]["mezo_over_forward"] == res["mezo_step_s"] / between["mezo"]
    assert res["ratios"]["reference_over_mezo"] == ((res["reference_step_s"] / between["reference"])
                                                    / (res["mezo_step_s"] / between["mezo"]))
    # overhead in weight copies: the step beyond its two forwards, over one copy of the trainable weights timed in
    # the variant's process (read + write of every fp32 weight); replay's is its step in copies
    copy_s = res["weight_copy_s"]
    assert set(copy_s) == set(res["overhead_in_copies"]) == {"mezo", "backprop", "reference", "replay"}
    assert all(s > 0 for s in copy_s.values())
    # (in triples: each step less twice the forward timed right after it, over the copy timed right after that
    # forward, scaled from the copy's bytes to the weights'; the median of those)
    triples = zip(res["times"]["mezo"], res["forward_times"]["mezo"], res["copy_times"]["mezo"])
    scale = 2 * 4 * params / res["copy_bytes"]["mezo"]
    assert res["overhead_in_copies"]["mezo"] == pytest.approx(
        statistics.median((t - 2 * f) / (c * scale) for t, f, c in triples), rel=1e-12)
    assert res["overhead_in_copies"]["replay"] == pytest.approx(1 / res["ratios"]["replay_bandwidth_fraction"],
                                                                rel=1e-12)  # the same figure, divided the other way
    assert "overhead in weight copies      MeZO" in format_bench(res)
    assert res["overhead_quartiles"] == {"mezo": None, "backprop": None, "reference": None}  # one call each
    # live tensors: at least the weights; backprop holds AdamW's two moments as well
    assert res["forward_tensor_peak_bytes"] >= 4 * params and res["backprop_tensor_peak_bytes"] >= 3 * 4 * params


def test_overhead_quartiles_are_those_of_the_per_call_ratios():
    """bench reports how far the overhead in copies moves from call to call: the quartiles of the ratios whose median
    is the figure (each call's time less two forwards, over the copy after them, scaled to the weights' bytes)."""
    from mezo_tune.bench import overhead_in_copies, overhead_quartiles

    result = {"bytes_moved": 800, "copy_bytes": 400, "times": [2.5, 2.9, 2.3, 3.1, 2.6],
              "forward_times": [1.0, 1.1, 1.0, 1.2, 1.0], "copy_times": [0.1, 0.2, 0.1, 0.1, 0.2]}
    ratios = [(0.5 / 0.2), (0.7 / 0.4), (0.3 / 0.2), (0.7 / 0.2), (0.6 / 0.4)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    assert overhead_quartiles(result) == pytest.approx((q1, q3), rel=1e-12)
    assert overhead_in_copies(result) == pytest.approx(statistics.median(ratios), rel=1e-12)
    assert overhead_quartiles({**result, "times": [2.5], "forward_times": [1.0], "copy_times": [0.1]}) is None


def test_tensor_peak_skips_fake_tensors_left_by_compile():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.ones(4)  # like those torch.compile's tracing leaves for the garbage collector: no storage
    kept = torch.ones(1000)
    peak = tensor_peak_bytes(lambda step: torch.ones(2000) + step, 0)
    assert peak >= kept.nbytes + 2000 * 4 and fake.shape == (4,)


def test_sweep_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    result = cli("bench", "--sweep", "--sizes", "64x1", "--seq-lens", "8", "--batch-size", 2, "--repeats", 1,
                 "--compile", "off", "--out", out)
    assert f"wrote {out}/sweep.json" in result.stdout
    res = json.loads((out / "sweep.json").read_text())
    (point,) = res["points"]
    assert (point["size"], point["seq_len"]) == ("64x1", 8)
    assert all(point[f"{v}_{k}"] > 0 for v in ("forward", "mezo", "backprop")
               for k in ("s", "peak_bytes", "tensor_peak_bytes"))
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_chart_and_table_over_several_points(tmp_path):
    pytest.importorskip("matplotlib")
    point = {"forward_s": 1.0, "mezo_s": 2.2, "backprop_s": 3.3, "mezo_over_forward": 2.2, "backprop_over_mezo": 1.5,
             "forward_tensor_peak_bytes": 2**30,
             "mezo_tensor_peak_bytes": 2**30, "backprop_tensor_peak_bytes": 3 * 2**30}
    res = {"device": "cpu", "dtype": "float32", "batch_size": 2, "repeats": 1,
           "points": [{"size": s, "params": n, "seq_len": t, **point}
                      for s, n in (("64x1", 2_100_000), ("128x2", 4_500_000)) for t in (8, 16)]}
    plot_sweep(res, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000
    table = format_sweep(res).splitlines()
    assert len(table) == 6 and table[2].split() == ["64x1", "2.1M", "8", "1.000", "2.200", "3.300", "2.20", "1.50",
                                                     "1024", "1024", "3072"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_reuses_freed_pages(tiny_model_dirs, lm_files, tmp_path):
    """After models.keep_freed_memory() (which train calls once a CPU model is loaded, as bench's children do) a large
    block freed and allocated again lands on pages already mapped: no page faults, where glibc's default (a fresh mmap
    for every large allocation) faults on each of its pages again. models.load alone (eval, replay) keeps the
    default."""
    from test_train import write_recipe

    code = """if True:
        import ctypes, resource, sys, types
        from mezo_tune import models
        if sys.argv[1] == "keep":
            assert models.keep_freed_memory()
        elif sys.argv[1] == "load":
            models.load(types.SimpleNamespace(path=sys.argv[2], dtype="float32", device="cpu"), progress=False)
        elif sys.argv[1] == "train":
            from mezo_tune.recipe import load_recipe
            from mezo_tune.train import train
            train(load_recipe(sys.argv[3]), progress=False, log=lambda msg: None)
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        def touched(n):
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            return ctypes.c_void_p(p)
        libc.free(touched(64 << 20))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        touched(64 << 20)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
    model_dir = str(tiny_model_dirs("llama"))
    recipe = write_recipe(tmp_path / "r.toml", model_dir, lm_files[0], out=tmp_path / "run", steps=2, save_final=False)
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode, model_dir, str(recipe)], capture_output=True,
                                       text=True, check=True).stdout.split()[-1])
              for mode in ("default", "keep", "load", "train")}
    assert faults["keep"] == faults["train"] == 0
    assert faults["default"] > 0  # 16385 with 4 KiB pages; fewer where the kernel hands out huge pages
    assert faults["load"] > 0


def test_bench_nproc_reports_each_rank_and_the_bytes_all_reduced():
    # torchrun with 2 processes (gloo): each rank scores one row of the global batch of 2; one all-reduce of four
    # float64 numbers (L+ and L-: loss sum and count) per step
    res = json.loads(cli("bench", "--model", "config:64x2", "--batch-size", 2, "--seq-len", 8, "--repeats", 1,
                         "--compile", "off", "--nproc", "2", "--json").stdout)
    (point,) = res["points"]
    assert point["nproc"] == 2 and [r["rank"] for r in point["ranks"]] == [0, 1]
    assert [r["rows"] for r in point["ranks"]] == [1, 1]
    assert point["reduced_bytes_per_step"] == 4 * 8
    assert all(r["peak_bytes"] > 0 and r["tensor_peak_bytes"] > 0 for r in point["ranks"])
    assert point["step_s"] == max(r["seconds"] for r in point["ranks"])


@pytest.mark.parametrize("nproc", ["3", "0", "two", ""])
def test_bench_nproc_must_be_counts_up_to_the_batch(nproc):
    result = cli("bench", "--batch-size", 2, "--nproc", nproc, ok=False)
    assert result.exit_code == 2
    assert (f"--nproc must be process counts from 1 to --batch-size (2) separated by commas, got {nproc!r}"
            in result.output)
