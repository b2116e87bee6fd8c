"""`make bench`: does PTG beat its baseline here, and by how much? Seeds as DVC experiments, paired statistics.

The benchmark runs the whole pipeline with ``configs/bench.yaml`` once per seed, as DVC experiments
(``dvc exp run --temp -n bench-seed-<s> -S seed=<s>``) in a git + DVC repository of its own (``build/bench``:
the pipeline files, a snapshot of ``src/`` that its stages import, the bench params as its params.yaml), each
under an MLflow parent run in the checkout's tracking store. ``--jobs`` experiments run side by side (each in
DVC's temporary copy of the repository, sharing its cache and run cache), each stage on cores // jobs threads.
Each experiment stays comparable with ``dvc exp show`` there. Seeds that finished with the same bench params are
skipped (other params run them again) and an interrupted one resumes from DVC's run cache, so a stopped bench
continues where it stopped; editing the checkout while a bench runs does not change the code it runs.

The PTG arm and the baseline arm (same training, uniform token weights) are evaluated on the same test items;
``collect`` turns the per-item scores of every seed into paired differences (PTG - baseline) of ROUGE-L, ROUGE-2
and METEOR per round, with a two-level bootstrap 95 % CI over test items and seeds (``ptg.stats``), and the
guidance's held-out pairwise accuracy with its CI, against chance and against a length heuristic. Writes
``metrics/bench/summary.json``, ``metrics/bench/table.md`` and ``metrics/bench/by_round.png``.

By concern: ``experiments`` (the repository, experiments run side by side and resumed, the plan of seeds, arms and
ablations), ``statistics`` (paired differences, ``collect``), ``tables`` (markdown tables, plots), ``prompt`` (the
prompt task's bench, ``ptg bench --task prompt``), ``rl`` (the policy-gradient bench, ``ptg bench --task rl``).

Run: ptg bench [--params configs/bench.yaml] [--seeds 0 1 2] [--jobs 3] [--dir build/bench] [--collect-only]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ptg.bench.experiments import (
    ABLATION_REFERENCE,
    ARMS,
    VALIDATION,
    Experiment,
    ablation_experiments,
    ablation_name,
    arm_experiments,
    arm_name,
    machine,
    run_all,
    run_experiment,
    seed_experiment,
    setup_repo,
    with_overrides,
)
from ptg.bench.statistics import (
    aligned,
    arm_differences,
    collect,
    collect_ablations,
    guidance_accuracy,
    round_differences,
    validation_curves,
)
from ptg.bench.tables import format_ablations, format_table, plot, plot_curves
from ptg.config import load as load_params

__all__ = ["ABLATION_REFERENCE", "ARMS", "VALIDATION", "ablation_experiments", "ablation_name", "aligned",
           "arm_differences", "arm_experiments", "arm_name", "collect", "collect_ablations", "format_ablations",
           "format_table", "guidance_accuracy", "machine", "plot", "plot_curves", "round_differences", "run",
           "run_all", "run_experiment", "seed_experiment", "setup_repo", "validation_curves", "with_overrides"]


def run(params: Path, directory: Path, out: Path, seeds: Sequence[int], arms: Sequence[Sequence[str]], jobs: int,
        collect_only: bool = False, ablations: Sequence[Sequence[str]] = (),
        ablation_seeds: Sequence[int] | None = None, ablations_only: bool = False) -> None:
    """Set up (or reuse) the bench repository with ``params``, run what is missing (the seeds, every arm of
    ``arms`` with every seed, then round 1 of each ablation ``(NAME, KEY=VALUE, ...)`` with ``ablation_seeds``),
    collect the statistics into ``out``."""
    if not collect_only:
        setup_repo(params, directory)
        experiments = [] if ablations_only else [seed_experiment(seed) for seed in seeds]
        if not ablations_only:
            experiments += arm_experiments(seeds, arms, load_params(directory / "params.yaml").last_round)
        if ablations:
            experiments += ablation_experiments(ablation_seeds or seeds[:1], ablations)
        # References first (the seeds' PTG and baseline, the ablations' reference), then what differs from them
        # only in LM training: those start once the references ahead of them have, and find the shared stages
        # (samples, rankings, guidance, baseline) in DVC's run cache instead of computing them again side by side.
        def is_reference(e: Experiment) -> bool:
            return e[0].startswith(("seed-", f"abl-{ABLATION_REFERENCE}-"))

        run_all(directory, sorted(experiments, key=lambda e: not is_reference(e)), jobs)
    if not ablations_only:
        collect(directory, out, seeds, arms)
    collect_ablations(directory, out)
