"""The copy task's facts: those of every task with references (``ptg.pipeline.round_report``,
``ptg.config.reference_baseline``), ROUGE-L the main metric."""

from ptg.config import reference_baseline as baseline_config
from ptg.pipeline.round_report import REFERENCE_EVAL_KEYS as EVAL_KEYS
from ptg.pipeline.round_report import reference_row as report_row

__all__ = ["EVAL_KEYS", "MAIN_METRIC", "baseline_config", "report_row"]

MAIN_METRIC = "rougeL"
