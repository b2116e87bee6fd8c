"""How the copy task evaluates an LM (evaluate@r, the baseline): as every task with references, greedy
predictions scored against every reference (``ptg.pipeline.evaluation.evaluate_references``: ROUGE, METEOR, and the
guidance's token rewards)."""

from ptg.pipeline.evaluation import evaluate_references as evaluate

__all__ = ["evaluate"]
