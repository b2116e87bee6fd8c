"""ptg.pipeline.evaluation: which items each arm is scored on (``evaluate.subset_items``), in a scratch project with
the quick profile's tiny models."""

import pandas as pd
import pytest
from conftest import REPO
from test_bad_inputs import data_folder, good_rows, set_params, stage

from ptg import pipeline, tasks
from ptg.config import load as load_params
from ptg.guidance.model import Guidance


@pytest.fixture
def project(tmp_path, monkeypatch):
    """prepare and base_model run on a 6-item test split, evaluate.subset_items 2, tracking off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PTG_TRACKING", "off")
    (tmp_path / "params.yaml").write_text((REPO / "configs" / "quick.yaml").read_text())
    set_params(tmp_path, data_folder(tmp_path, test=b"".join(
        f'{{"id": "{r["id"]}", "input": "{r["input"]}", "target": "{r["target"]}"}}\n'.encode()
        for r in good_rows("test", 6))) | {"evaluate": {"subset_items": 2}})
    stage("prepare").main("params.yaml")
    stage("base_model").main("params.yaml")
    return tmp_path


def _items(project, arm: str, r: int, last_round: bool) -> list[str]:
    ctx = pipeline.start(f"evaluate@{r}", load_params("params.yaml"))
    guidance = Guidance.from_backbone(pipeline.round_dir(0) / "guidance" / "backbone") if arm == "ptg" else None
    metrics = (pipeline.round_metrics if arm == "ptg" else pipeline.baseline_metrics)(r, "evaluate")
    out = project / "data" / arm / str(r)
    tasks.evaluation(ctx.params).evaluate(pipeline.round_dir(0) / "lm", guidance, out / "predictions.parquet",
                                             metrics, ctx, last_round=last_round, seed=0)
    return pd.read_csv(metrics.with_name("evaluate_items.csv"))["id"].tolist()


def test_rounds_before_the_last_score_both_arms_on_the_same_first_items_and_the_last_round_on_all(project):
    test_ids = pd.read_parquet(project / "data" / "prepared" / "test.parquet")["id"].tolist()
    assert len(test_ids) == 6
    for arm in ("ptg", "baseline"):
        assert _items(project, arm, 1, last_round=False) == test_ids[:2], arm
        assert _items(project, arm, 2, last_round=True) == test_ids, arm
