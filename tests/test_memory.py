"""Memory (issue #13): the start-up warning of a CPU run that is estimated not to fit, the advice after a CUDA
out-of-memory error (its message built from numbers here; the real error only where there is a GPU), and where
models.keep_freed_memory applies."""

from __future__ import annotations

import re

import pytest
import torch
from test_train import cli, train_cli, write_recipe

from mezo_tune import estimate
from mezo_tune.recipe import load_recipe
from mezo_tune.trajectory import read_trajectory

GIB = 1 << 30
CANDIDATES = [("mezo.batch_size = 8", 30 * GIB), ("mezo.batch_size = 4", 20 * GIB), ("mezo.batch_size = 2", 15 * GIB),
              ("mezo.batch_size = 1", 12 * GIB), ('adapter.type = "lora"', 14 * GIB),
              ('model.quantization = "4bit" with adapter.type = "lora"', 5 * GIB)]


def test_fit_advice_names_the_largest_batch_and_each_other_change_that_fits():
    assert estimate.fit_advice(CANDIDATES, 16 * GIB) == (
        'Estimated to fit: mezo.batch_size = 2 (15.00 GiB); adapter.type = "lora" (14.00 GiB); '
        'model.quantization = "4bit" with adapter.type = "lora" (5.00 GiB).')
    assert estimate.fit_advice(CANDIDATES, 6 * GIB) == (
        'Estimated to fit: model.quantization = "4bit" with adapter.type = "lora" (5.00 GiB).')
    assert estimate.fit_advice(CANDIDATES[:2], 6 * GIB) == (
        "No nearby configuration is estimated to fit (mezo.batch_size = 8, mezo.batch_size = 4): use a smaller model "
        "or a machine with more memory.")


def test_memory_warning_only_when_the_estimate_exceeds_what_is_available():
    assert estimate.memory_warning(16 * GIB, 16 * GIB, CANDIDATES) is None
    assert estimate.memory_warning(40 * GIB, 21 * GIB, CANDIDATES[:5]) == (
        "warning: this run's estimated peak memory, 40.00 GiB (`mezo-tune train --dry-run` shows its parts), exceeds "
        "the memory available now, 21.00 GiB: it may swap or be killed. Estimated to fit: mezo.batch_size = 4 "
        '(20.00 GiB); adapter.type = "lora" (14.00 GiB). Or free memory and start again.')


def test_oom_message_names_the_step_the_device_and_what_fits():
    assert estimate.oom_message(7, "cuda:0", 16 * GIB, 40 * GIB, CANDIDATES, "runs/x/trajectory.mezo") == (
        "step 7: out of memory on cuda:0 (16.00 GiB; this recipe's estimated peak is 40.00 GiB, `mezo-tune train "
        "--dry-run` shows its parts). Estimated to fit: mezo.batch_size = 2 (15.00 GiB); adapter.type = \"lora\" "
        "(14.00 GiB); model.quantization = \"4bit\" with adapter.type = \"lora\" (5.00 GiB). These change the run, so "
        "start a new one with the change (another output.dir); runs/x/trajectory.mezo keeps the steps before 7.")


def test_variants_are_the_estimates_of_the_changed_recipes(tmp_path, lm_files, tiny_model_dirs):
    train, _ = lm_files
    r = load_recipe(write_recipe(tmp_path / "r.toml", tiny_model_dirs("llama", "float32"), train, out=tmp_path / "o",
                                 batch_size=8))
    found = estimate.variants(r, cuda=True)
    assert [c for c, _ in found] == ["mezo.batch_size = 4", "mezo.batch_size = 2", "mezo.batch_size = 1",
                                     'adapter.type = "lora"', 'model.quantization = "4bit" with adapter.type = "lora"']
    assert [c for c, _ in estimate.variants(r, cuda=False)] == [c for c, _ in found[:4]]
    model = estimate.meta_model(r.model, r.adapter)
    for (_, peak), bs in zip(found, (4, 2, 1)):
        smaller = r.model_copy(update={"mezo": r.mezo.model_copy(update={"batch_size": bs})})
        assert peak == estimate.estimate_peak_bytes(model, smaller)["peak_bytes"]
    peaks = [p for _, p in found]
    assert peaks[0] > peaks[1] > peaks[2] and peaks[4] < peaks[3]  # 4bit stores the decoder linears in half a byte


def test_cpu_run_estimated_not_to_fit_warns_at_start_up(tmp_path, lm_files, tiny_model_dirs):
    """data.max_length = 2**40 makes the estimate (which assumes rows that long) exceed any machine's memory while
    the real rows stay short, so the run warns and then trains."""
    train, _ = lm_files
    recipe = write_recipe(tmp_path / "r.toml", tiny_model_dirs("llama", "float32"), train, out=tmp_path / "o",
                          steps=2, max_length=2**40, save_final=False)
    r = load_recipe(recipe)
    peak = estimate.estimate_peak_bytes(estimate.meta_model(r.model, r.adapter), r)["peak_bytes"]
    out = train_cli(recipe).output
    warning = [line for line in out.splitlines() if line.startswith("warning: this run")]
    assert len(warning) == 1
    assert re.fullmatch(
        re.escape(f"warning: this run's estimated peak memory, {peak / GIB:.2f} GiB (`mezo-tune train --dry-run` shows "
                  f"its parts), exceeds the memory available now, ") + r"\d+\.\d\d"
        + re.escape(' GiB: it may swap or be killed. No nearby configuration is estimated to fit (mezo.batch_size = 1, '
                    'adapter.type = "lora"): use a smaller model or a machine with more memory. Or free memory and '
                    'start again.'), warning[0])
    assert read_trajectory(tmp_path / "o/trajectory.mezo").end["steps"] == 2
    small = write_recipe(tmp_path / "s.toml", tiny_model_dirs("llama", "float32"), train, out=tmp_path / "s", steps=1,
                         save_final=False)
    assert "warning: this run" not in train_cli(small).output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the out-of-memory error is CUDA's")
def test_cuda_out_of_memory_in_a_step_stops_with_the_advice(tmp_path, lm_files, tiny_model_dirs):
    """A real torch.cuda.OutOfMemoryError: the process may use 1 GiB, a step's logits need several."""
    train, _ = lm_files
    recipe = write_recipe(tmp_path / "r.toml", tiny_model_dirs("llama", "float32"), train, out=tmp_path / "o",
                          steps=2, batch_size=65536, save_final=False)
    text = recipe.read_text().replace('device = "cpu"', 'device = "cuda:0"')
    recipe.write_text(text)
    total = torch.cuda.mem_get_info(0)[1]
    torch.cuda.set_per_process_memory_fraction(GIB / total, 0)
    try:
        result = cli("train", recipe, "-q", ok=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    assert result.exit_code == 1
    assert re.search(re.escape("step 0: out of memory on cuda:0 (") + r"\d+\.\d\d GiB; this recipe's estimated peak is "
                     + r"\d+\.\d\d GiB, `mezo-tune train --dry-run` shows its parts\)\. Estimated to fit: ", result.output)
    assert (f"These change the run, so start a new one with the change (another output.dir); "
            f"{tmp_path / 'o/trajectory.mezo'} keeps the steps before 0.") in result.output
    data = read_trajectory(tmp_path / "o/trajectory.mezo")
    assert (len(data.steps), data.problem, data.end) == (0, None, None)
