"""The summarisation task's facts: what the registry's "best" alias maximises, the report's columns (those of
every task with references, ``ptg.pipeline.round_report``) and the baseline (uniform MLE,
``ptg.config.reference_baseline``)."""

from ptg.config import reference_baseline as baseline_config
from ptg.pipeline.round_report import REFERENCE_EVAL_KEYS as EVAL_KEYS
from ptg.pipeline.round_report import reference_row as report_row

__all__ = ["EVAL_KEYS", "MAIN_METRIC", "baseline_config", "report_row"]

MAIN_METRIC = "rougeL"
