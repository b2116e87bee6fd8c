"""Preference data people already have (ptg.guidance.preferences): listwise and pairwise files become validated, split
ranked groups, bad input gets an error naming the file and column, groups of different K fit together, and the
guidance fitted on them is evaluated against honest baselines (ptg.guidance.standalone)."""

import dataclasses
import json

import pandas as pd
import pytest
import torch
import yaml
from conftest import EOS, PAD, REPO, tiny_llama
from test_guidance_train import FIT, guidance_for

from ptg.config import PreferencesParams
from ptg.config import load as load_params
from ptg.guidance import preferences
from ptg.guidance.model import RankedGroup, _group_batches, evaluate_guidance, fit_guidance
from ptg.io import TableError

PP = PreferencesParams()
REPO_QUICK = REPO / "configs" / "quick.yaml"


def _write(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _listwise(n_inputs=4, k=3):
    return [{"input": f"def f{i}(): pass", "text": f"candidate {j} of {i}", "score": float(j)}
            for i in range(n_inputs) for j in range(k)]


def test_listwise_and_pairwise_become_the_same_long_table(tmp_path):
    long = preferences.normalize(pd.DataFrame(_listwise(2, 3)), PP, "x.jsonl")
    assert list(long.columns) == list(preferences.COLUMNS)
    assert long.groupby("group")["text"].count().tolist() == [3, 3]
    pairs = pd.DataFrame([{"prompt": "p1", "chosen": "good", "rejected": "bad"},
                          {"prompt": "p2", "chosen": "yes", "rejected": "no"}])
    long = preferences.normalize(pairs, PP, "pairs.csv")  # layout auto: the chosen column makes it pairwise
    assert long[["input", "text", "score"]].values.tolist() == [
        ["p1", "good", 1.0], ["p1", "bad", 0.0], ["p2", "yes", 1.0], ["p2", "no", 0.0]]
    assert long["group"].nunique() == 2


def test_columns_are_configurable(tmp_path):
    raw = pd.DataFrame([{"article": "a", "summary": "s1", "rating": 3}, {"article": "a", "summary": "s2", "rating": 1}])
    pp = dataclasses.replace(PP, input_field="article", text_field="summary", score_field="rating")
    assert preferences.normalize(raw, pp, "f").score.tolist() == [3.0, 1.0]


@pytest.mark.parametrize("rows, column, message", [
    ([{"input": "a", "text": "x", "score": "nan"}, {"input": "a", "text": "y", "score": 1}], "score", "nan"),
    ([{"input": "a", "text": "x", "score": "inf"}, {"input": "a", "text": "y", "score": 1}], "score", "finite"),
    ([{"input": "a", "text": " ", "score": 0}, {"input": "a", "text": "y", "score": 1}], "text", "non_blank"),
    ([{"input": "a", "text": "x", "score": 0}, {"input": "a", "text": "x", "score": 1}], "text", "group"),
])
def test_bad_rows_name_the_file_and_the_column(tmp_path, rows, column, message):
    path = _write(tmp_path, rows)
    with pytest.raises(TableError) as err:
        preferences.load(dataclasses.replace(PP, path=path))
    assert path in str(err.value) and column in str(err.value) and message in str(err.value)


def test_a_missing_column_names_the_param_and_what_the_file_has(tmp_path):
    path = _write(tmp_path, [{"question": "a", "text": "x", "score": 1}])
    with pytest.raises(ValueError, match=r"missing column\(s\) 'input' \(preferences.input_field\).*'question'"):
        preferences.load(dataclasses.replace(PP, path=path))


def test_groups_that_rank_nothing_are_skipped_and_counted_or_an_error_when_all_are(tmp_path):
    rows = _listwise(3, 2) + [{"input": "lonely", "text": "only one", "score": 1.0},
                              {"input": "tied", "text": "t1", "score": 2.0},
                              {"input": "tied", "text": "t2", "score": 2.0}]
    long, counts = preferences.load(dataclasses.replace(PP, path=_write(tmp_path, rows)))
    assert counts["skipped_single_candidate"] == 1 and counts["skipped_equal_scores"] == 1
    assert set(long["input"]) == {f"def f{i}(): pass" for i in range(3)}
    with pytest.raises(ValueError, match="none of the 1 groups ranks anything"):
        preferences.load(dataclasses.replace(PP, path=_write(tmp_path, rows[-2:], "tied.jsonl")))


def test_the_heldout_split_is_by_input_stable_and_an_input_on_both_sides_is_an_error(tmp_path):
    rows = [dict(r, group=f"{r['input']}#{k}") for k in range(2) for r in _listwise(40, 2)]  # two lists per input
    pp = dataclasses.replace(PP, path=_write(tmp_path, rows), heldout_fraction=0.3)
    long, counts = preferences.load(pp)
    assert long.groupby("input")["split"].nunique().max() == 1  # an input's lists stay on one side
    assert 0 < counts["validation_groups"] < counts["train_groups"]
    assert preferences.load(pp)[0]["split"].tolist() == long["split"].tolist()  # stable
    rows = [dict(r, split="train") for r in _listwise(1, 2)] + [dict(r, split="validation", text=r["text"] + "!")
                                                               for r in _listwise(1, 2)]
    for i, r in enumerate(rows):
        r["group"] = f"g{i // 2}"
    with pytest.raises(ValueError, match="in both the train and the validation split"):
        preferences.load(dataclasses.replace(PP, path=_write(tmp_path, rows, "both.jsonl")))


def test_mix_groups_gives_the_preference_share_asked_for():
    own, prefs = list(range(30)), [f"p{i}" for i in range(5)]
    assert preferences.mix_groups(own, prefs, 0.0, 0) == own
    assert preferences.mix_groups(own, prefs, 1.0, 0) == prefs
    mixed = preferences.mix_groups(own, prefs, 0.25, 0)
    assert mixed[:30] == own and len(mixed) == 40 and set(mixed[30:]) == set(prefs)  # drawn again once used up
    assert preferences.mix_groups(own, prefs, 0.25, 0) == mixed


def test_groups_of_different_k_never_share_a_batch_and_fit_together():
    groups = [RankedGroup([2, 3 + i % 5], [[4 + j, EOS] for j in range(k)], [float(j) for j in range(k)])
              for i, k in enumerate([2, 3, 2, 4, 3, 2, 4, 3])]
    batches = list(_group_batches(groups, 2, PAD, list(range(len(groups)))))
    assert sorted(prefs.shape[1] for _, prefs in batches for _ in range(prefs.shape[0])) == sorted(
        len(g.responses) for g in groups)
    assert all(b.group_size == p.shape[1] for b, p in batches)
    g = guidance_for(tiny_llama())
    result = fit_guidance(g, groups, groups, dataclasses.replace(FIT, max_updates=4, eval_every=2), PAD,
                          torch.device("cpu"), progress=False)
    assert result.updates == 4
    # The loss over mixed K is the group-weighted mean of each K's loss.
    cpu = torch.device("cpu")
    whole = evaluate_guidance(g, groups, FIT, PAD, cpu, torch.float32)
    parts = [[gr for gr in groups if len(gr.responses) == k] for k in (2, 3, 4)]
    each = [evaluate_guidance(g, p, FIT, PAD, cpu, torch.float32) for p in parts]
    weighted = sum(e["loss"] * len(p) for e, p in zip(each, parts, strict=True))
    assert whole["loss"] == pytest.approx(weighted / len(groups))
    assert whole["pairs"] == sum(e["pairs"] for e in each)


def test_evaluation_of_lists_of_two_sizes_against_hand_computed_values(monkeypatch):
    """Two K = 3 lists (one scored in the preferred order, one reversed) and a K = 2 list scored as a tie: ListMLE
    per list sum_j [log sum_{i>=j} exp(s_i) - s_j] in preference order, mean over lists; ties count half a pair."""
    from ptg.guidance import model as guidance_module

    groups = [RankedGroup([2], [[4], [5], [6]], [3.0, 2.0, 1.0]), RankedGroup([2], [[4], [5], [6]], [3.0, 2.0, 1.0]),
              RankedGroup([2], [[4], [5]], [1.0, 0.0])]
    monkeypatch.setattr(guidance_module, "group_scores", lambda *a: [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.5, 0.5]])
    out = evaluate_guidance(None, groups, FIT, PAD, torch.device("cpu"), torch.float32)
    # (log(e^2 + e + 1) - 2) + (log(e + 1) - 1) = 0.720868; log(e^2 + e + 1) + (log(e^2 + e) - 1) = 3.720868;
    # log 2 = 0.693147; their mean 1.711627.
    assert out["loss"] == pytest.approx(1.7116275, abs=1e-6)
    assert (out["accuracy"], out["pairs"]) == (3.5 / 7, 7)


def test_corruption_fixture_scores_by_corruption_level_in_both_layouts():
    ex = pd.DataFrame({"id": ["a", "b", "c"], "input": ["def a(): ...", "def b(): ...", "def c(): ..."],
                       "target": ["Return the sum of two numbers.", "Open the file for reading now.",
                                  "Close every handle that is still open."]})
    listwise = preferences.corruption_fixture(ex, seed=1)
    a = listwise[listwise["group"] == "a"]
    assert a["score"].tolist() == [3.0, 2.0, 1.0, 0.0] and a["text"].iloc[0] == "Return the sum of two numbers."
    assert [len(t.split()) for t in a["text"][:3]] == [6, 6, 6]  # levels 1-2 keep the length
    assert a["text"].iloc[3] in set(ex["target"]) - {"Return the sum of two numbers."}
    pairwise = preferences.corruption_fixture(ex, seed=1, layout="pairwise")
    assert list(pairwise.columns) == ["prompt", "chosen", "rejected", "reference"] and len(pairwise) == 3
    for _, row in pairwise.iterrows():  # chosen is the less corrupted one
        group = listwise[listwise["input"] == row["prompt"]].set_index("text")["score"]
        assert group[row["chosen"]] > group[row["rejected"]]


@pytest.mark.slow
def test_a_pipeline_round_fits_a_prior_then_mixes_preferences_with_its_own_samples(quick_pipeline, tmp_path):
    from conftest import copy_workspace, run

    from ptg.corpus import build_examples

    examples = build_examples(load_params(REPO_QUICK).data)["train"]
    path = _write(tmp_path, preferences.corruption_fixture(examples, seed=0).to_dict("records"), "fixture.jsonl")
    ws = copy_workspace(quick_pipeline, tmp_path / "ws", preferences={
        "path": path, "weight": 0.5, "prior_updates": 4, "heldout_fraction": 0.25})
    run(["dvc", "repro", "fit_guidance@1"], ws)
    counts = json.loads((ws / "metrics" / "preferences.json").read_text())
    assert counts["groups"] == len(examples) and counts["validation_groups"] > 0
    m = json.loads((ws / "metrics" / "rounds" / "1" / "fit_guidance.json").read_text())
    assert m["prior_updates"] == 4 and m["preference_train_groups"] == counts["train_groups"]
    assert m["fitted_groups"] == 2 * m["train_groups"]  # weight 0.5: as many preference groups as own groups
    assert m["preferences_val_pairs"] > 0 and 0 <= m["preferences_val_accuracy"] <= 1
    # `preferences` runs on every repro; while the data is the same its output is too, and nothing reruns.
    assert "Running stage 'fit_guidance@1'" not in run(["dvc", "repro", "fit_guidance@1"], ws).stdout


@pytest.mark.slow
def test_standalone_fit_reports_heldout_accuracy_writes_heatmaps_and_scores_texts(tmp_path, monkeypatch):
    from ptg.guidance.standalone import evaluate_file, fit_file, score_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PTG_TRACKING", "off")
    (tmp_path / "params.yaml").write_text(REPO_QUICK.read_text())
    rows = [{"prompt": f"def f{i}(x): return x + {i}", "chosen": f"Add {i} to x.", "rejected": "Open a socket.",
             "reference": f"Add {i} to x."} for i in range(40)]
    params = load_params("params.yaml")
    pp = dataclasses.replace(params.preferences, path=_write(tmp_path, rows, "pairs.jsonl"), heldout_fraction=0.3)
    out = fit_file(pp, tmp_path / "out", params, max_updates=4)
    report = out["report"]
    for scorer in ("guidance", "length", "rouge_vs_reference", "meteor_vs_reference"):
        assert {"accuracy", "lo", "hi", "p_vs_chance", "pairs"} <= set(report[scorer])
    assert report["rouge_vs_reference"]["accuracy"] == 1.0  # chosen == reference in every pair
    for name in ("heldout.json", "heldout.md", "heldout_candidates.csv", "heatmap.html", "heatmap.png",
                 "guidance/head.safetensors"):
        assert (tmp_path / "out" / name).is_file(), name
    # Any guidance evaluates on the same held-out lists: the fitted one gives the fit's own table again.
    again = evaluate_file(tmp_path / "out" / "guidance", pp, tmp_path / "eval", params)
    assert again["guidance"] == report["guidance"] and (tmp_path / "eval" / "heldout.md").is_file()
    texts = _write(tmp_path, [{"input": "def g(): pass", "text": "Do nothing."}], "texts.jsonl")
    table = score_file(tmp_path / "out" / "guidance", tmp_path / texts, tmp_path / "scored.jsonl", pp, params)
    assert len(table["token_rewards"][0]) == len(table["tokens"][0]) > 0
    assert table["score"][0] == pytest.approx(sum(table["token_rewards"][0]) / len(table["token_rewards"][0]))
    assert (tmp_path / "scored.jsonl").is_file()


def _word_level_base(root, texts, vocab_size=400):
    """lm/ and guidance/backbone of a tiny Llama whose tokenizer has one token per frequent word ([UNK] for the
    rest), so that a corrupted word is one token: the signal a guidance can learn in a minute on a CPU."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ptg.lm.base_models import build_tiny, truncate_backbone

    specials = ["<pad>", "</s>", "<s>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    words = [w for w, _ in Counter(w for t in texts for w in t.split()).most_common(vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<pad>", unk_token="[UNK]")
    fast.save_pretrained(root / "tok")
    build_tiny("tiny-llama", root / "lm", tokenizer_dir=root / "tok")
    truncate_backbone(root / "lm", 1, root / "guidance" / "backbone")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["listwise", "pairwise"])
def test_the_guidance_learns_the_corruption_fixture_well_above_chance_and_length(tmp_path, monkeypatch, layout):
    from ptg.corpus import build_examples
    from ptg.guidance.standalone import fit_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PTG_TRACKING", "off")
    params = yaml.safe_load(REPO_QUICK.read_text())
    params["data"]["max_train"] = 400
    params["fit_guidance"] |= {"lr": 1e-3, "max_updates": 150, "eval_every": 25, "head_hidden": 128}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params("params.yaml")
    examples = build_examples(loaded.data)["train"]
    # Without wrong-function docstrings (level 3): telling those apart needs a backbone that reads code.
    fixture = preferences.corruption_fixture(examples, seed=0, layout=layout, levels=(0, 1, 2))
    base = _word_level_base(tmp_path / "base", examples["target"].tolist())
    pp = dataclasses.replace(loaded.preferences, path=_write(tmp_path, fixture.to_dict("records")),
                             heldout_fraction=0.25)
    report = fit_file(pp, tmp_path / "out", loaded, base=base)["report"]
    acc = report["guidance"]
    assert acc["lo"] > 0.6 and acc["p_vs_chance"] < 0.01, report  # well above chance, CI included
    assert report["guidance_minus_length"]["lo"] > 0, report       # and above ranking by length
