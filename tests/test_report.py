"""ptg.pipeline.round_report: every column of the PTG-vs-baseline tables comes from the arm and round it names."""

import importlib
import json

import pandas as pd

from ptg.pipeline.round_report import GUIDANCE_KEYS, WEIGHT_KEYS, build_report, format_report

SUMMARISATION = importlib.import_module("ptg.tasks.summarisation.info")
PROMPT = importlib.import_module("ptg.tasks.prompt.info")
EVAL_KEYS, PROMPT_EVAL_KEYS = SUMMARISATION.EVAL_KEYS, PROMPT.EVAL_KEYS


def _write(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


def _metrics(root, task):
    """Rounds 1 and 2 where every value says where it came from: PTG 10 * r + i, the baseline 100 + 10 * r + i."""
    keys = PROMPT_EVAL_KEYS if task == "prompt" else EVAL_KEYS
    for r in (1, 2):
        for folder, offset in (("rounds", 0), ("baseline", 100)):
            values = {k: offset + 10 * r + i for i, k in enumerate(keys)} | {"split": "test"}
            values |= {"prompt": f"{folder} {r}"} if task == "prompt" else {
                "guidance_score": 1000 + r, "reward_eos": 0.5 + r, "reward_other": 0.25 + r}
            _write(root / folder / str(r) / "evaluate.json", values)
        _write(root / "rounds" / str(r) / "fit_guidance.json",
               {k: 0.1 * r + i for i, k in enumerate(GUIDANCE_KEYS)} | {"kept_start": False})
        _write(root / "rounds" / str(r) / "train_lm.json", {k: 0.01 * r + i for i, k in enumerate(WEIGHT_KEYS)})


def test_columns_come_from_their_arm_and_round(tmp_path):
    _metrics(tmp_path, "summarisation")
    evals, guidance = build_report([1, 2], tmp_path, SUMMARISATION)
    for r, row in zip((1, 2), evals.to_dict("records"), strict=True):
        assert row["round"] == r
        for i, k in enumerate(EVAL_KEYS):
            assert (row[f"ptg_{k}"], row[f"mle_{k}"]) == (10 * r + i, 100 + 10 * r + i), k
        assert (row["ptg_guidance_score"], row["reward_eos"], row["reward_other"]) == (1000 + r, 0.5 + r, 0.25 + r)
    for r, row in zip((1, 2), guidance.to_dict("records"), strict=True):
        assert {k: row[k] for k in WEIGHT_KEYS} == {k: 0.01 * r + i for i, k in enumerate(WEIGHT_KEYS)}
        assert row["val_accuracy"] == 0.1 * r + GUIDANCE_KEYS.index("val_accuracy")
    # The written CSVs are the returned tables, and the printed table puts each arm under its own header.
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "report" / "eval_by_round.csv"), evals)
    lines = format_report(evals, guidance).splitlines()
    assert lines[1].split()[:9] == ["round", "PTG", "ROUGE-L", "base", "ROUGE-L", "PTG", "METEOR", "base", "METEOR"]
    rouge, meteor = EVAL_KEYS.index("rougeL"), EVAL_KEYS.index("meteor")
    assert [float(x) for x in lines[3].split()[:5]] == [2, 20 + rouge, 120 + rouge, 20 + meteor, 120 + meteor]


def test_prompt_task_columns_come_from_their_arm(tmp_path):
    _metrics(tmp_path, "prompt")
    evals, _ = build_report([1, 2], tmp_path, PROMPT)
    row = evals.to_dict("records")[1]
    for i, k in enumerate(PROMPT_EVAL_KEYS):
        assert (row[f"ptg_{k}"], row[f"mle_{k}"]) == (20 + i, 120 + i), k
    assert (row["ptg_prompt"], row["mle_prompt"]) == ("rounds 2", "baseline 2")
