"""params.yaml groups load into typed configs that fail fast, and ranks are derived from scores per group."""

import pandas as pd
import pytest
import yaml
from conftest import REPO

from ptg.config import ParamsError, PreferencesParams
from ptg.config import load as load_params
from ptg.guidance.ranking import human_scores, rank_within_groups, unfinished_last


@pytest.mark.parametrize("params", ["params.yaml", "configs/quick.yaml", "configs/bench.yaml", "configs/gpu.yaml",
                                    "configs/prompt.yaml", "configs/bench-rl.yaml", "configs/paper-cnndm.yaml"])
def test_shipped_params_files_load_completely(params):
    numbers = [r["round"] for r in load_params(REPO / params).rounds]  # every group checked
    assert numbers == list(range(1, len(numbers) + 1))


def _write(tmp_path, mutate):
    params = yaml.safe_load((REPO / "configs" / "quick.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_unknown_missing_and_bad_keys_name_the_key(tmp_path):
    path = _write(tmp_path, lambda p: p["fit_guidance"].update(learning_rate=1.0))
    with pytest.raises(ParamsError, match="fit_guidance: unknown key.*learning_rate"):
        load_params(path)
    path = _write(tmp_path, lambda p: p["train_lm"].pop("lr"))
    with pytest.raises(ParamsError, match="train_lm: missing key.*lr"):
        load_params(path)
    path = _write(tmp_path, lambda p: p["train_lm"].update(objective="ppo"))
    with pytest.raises(ParamsError, match="objective"):
        load_params(path)
    path = _write(tmp_path, lambda p: p["evaluate"].update(split="dev"))
    with pytest.raises(ParamsError, match="evaluate: split must be one of test, validation; got 'dev'"):
        load_params(path)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda lora: lora.pop("alpha"), r"train_lm.lora: missing key\(s\) alpha"),
    (lambda lora: lora.update(rnk=4), r"train_lm.lora: unknown key\(s\) rnk"),
    (lambda lora: lora.update(rank="8"), r"train_lm.lora: rank must be an integer; got '8'"),
    (lambda lora: lora.update(rank=-1), r"train_lm.lora: rank must be >= 0; got -1"),
    (lambda lora: lora.update(dropout=1.0), r"train_lm.lora: dropout must be < 1; got 1.0"),
])
def test_lora_params_are_checked_like_a_group(tmp_path, mutate, message):
    path = _write(tmp_path, lambda p: mutate(p["train_lm"]["lora"]))
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_lora_with_a_carried_optimizer_is_refused(tmp_path):
    path = _write(tmp_path, lambda p: p["train_lm"].update(carry_optimizer=True, lora={**p["train_lm"]["lora"],
                                                                                      "rank": 4}))
    with pytest.raises(ParamsError, match="train_lm: carry_optimizer needs full fine-tuning"):
        load_params(path)
    assert load_params(_write(tmp_path, lambda p: p["train_lm"]["lora"].update(rank=4))).train_lm.lora.enabled


def test_add_lora_trains_only_seeded_adapters_and_names_a_bad_target():
    import torch
    from conftest import tiny_llama

    from ptg.lm.models import add_lora

    a, b = (add_lora(tiny_llama(), 4, 8.0, 0.0, None, seed=3) for _ in range(2))
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters() if "lora_A" in n)
    c = add_lora(tiny_llama(), 4, 8.0, 0.0, None, seed=4)
    assert not all(torch.equal(p, dict(c.named_parameters())[n]) for n, p in a.named_parameters() if "lora_A" in n)
    with pytest.raises(ValueError, match="train_lm.lora.target_modules: 'qkv' does not fit LlamaForCausalLM"):
        add_lora(tiny_llama(), 4, 8.0, 0.0, "qkv", seed=0)


def test_rounds_must_be_a_quoted_chain(tmp_path):
    path = _write(tmp_path, lambda p: p.update(rounds={1: {"prev": 0}}))
    with pytest.raises(ParamsError, match="quoted key"):
        load_params(path)
    path = _write(tmp_path, lambda p: p.update(rounds={"1": {"prev": 0}, "3": {"prev": 2}}))
    with pytest.raises(ParamsError, match="entry 2"):
        load_params(path)


@pytest.mark.parametrize(("value", "message"), [
    ("", r"params.yaml: launcher must be a non-empty command \(e.g. python\); got ''"),
    ("  ", r"params.yaml: launcher must be a non-empty command \(e.g. python\); got '  '"),
    (None, r"params.yaml: launcher must be a string; got None"),
    (4, r"params.yaml: launcher must be a string; got 4 \(int\)"),
])
def test_the_launcher_must_be_a_command(tmp_path, value, message):
    path = _write(tmp_path, lambda p: p.update(launcher=value))
    with pytest.raises(ParamsError, match=message):
        load_params(path)
    path = _write(tmp_path, lambda p: p.pop("launcher"))
    with pytest.raises(ParamsError, match=r"params.yaml: missing key\(s\) launcher"):
        load_params(path)
    launcher = "accelerate launch --multi_gpu --num_processes 2"
    assert load_params(_write(tmp_path, lambda p: p.update(launcher=launcher))).run.launcher == launcher


def test_rank_within_groups_orders_by_score_with_stable_ties():
    scores = pd.DataFrame({"id": ["b", "b", "b", "a", "a"], "sample_idx": [0, 1, 2, 0, 1],
                           "score": [0.2, 0.9, 0.2, 0.1, 0.3]})
    ranked = rank_within_groups(scores)
    assert ranked[["id", "sample_idx"]].values.tolist() == [["a", 0], ["a", 1], ["b", 0], ["b", 1], ["b", 2]]
    assert ranked["rank"].tolist() == [2, 1, 2, 1, 3]


def test_unfinished_samples_rank_below_finished_ones_and_keep_their_order():
    scores = pd.DataFrame({"id": ["a", "a", "a", "b", "b"], "sample_idx": [0, 1, 2, 0, 1],
                           "score": [0.9, 0.2, 0.5, 0.7, 0.6]})
    finished = pd.Series([False, True, False, False, False])
    ranked = rank_within_groups(scores.assign(score=unfinished_last(scores["score"], finished)))
    # a: the only finished sample wins despite the lowest score; the unfinished keep their score order.
    assert ranked["rank"].tolist() == [2, 1, 3, 1, 2]
    assert rank_within_groups(scores)["rank"].tolist() == [1, 3, 2, 1, 2]  # keep: by score alone


def test_an_unknown_unfinished_ranking_names_the_param(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["rank"]["unfinished"] = "drop"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="p.yaml: rank: unfinished must be one of keep, last; got 'drop'"):
        load_params(tmp_path / "p.yaml")


def test_human_scores_lookup_names_missing_samples():
    samples = pd.DataFrame({"id": ["a", "a"], "text": ["x", "y"]})
    table = pd.DataFrame({"id": ["a"], "text": ["x"], "score": [1.0]})
    with pytest.raises(ValueError, match="scores.csv: no score for 1 sample.*'y'"):
        human_scores(samples, table, "scores.csv")
    table = pd.DataFrame({"id": ["a", "a"], "text": ["x", "y"], "score": [1.0, 2.0]})
    assert human_scores(samples, table, "scores.csv") == [1.0, 2.0]


def test_rounds_carry_per_round_budgets_and_reject_bad_ones(tmp_path):
    from ptg.config import load as load_params

    spec = {"1": {"prev": 0, "fit_guidance_updates": 30}, "2": {"prev": 1, "train_lm_updates": 70}}
    path = _write(tmp_path, lambda p: p.update(rounds=spec))
    assert load_params(path).rounds[1] == {"round": 2, "prev": 1, "fit_guidance_updates": None, "train_lm_updates": 70}
    base_lm, base_fit = load_params(path).train_lm.max_updates, load_params(path).fit_guidance.max_updates
    assert load_params(path).budget("train_lm", 1).max_updates == base_lm
    assert load_params(path).budget("train_lm", 2).max_updates == 70
    assert load_params(path).budget("fit_guidance", 1).max_updates == 30
    assert load_params(path).budget("fit_guidance", 2).max_updates == base_fit
    for bad, match in (({"prev": 0, "train_lm_updates": 0}, "train_lm_updates must be an integer >= 1"),
                       ({"prev": 0, "train_lm_updates": "5"}, "train_lm_updates"),
                       ({"prev": 0, "lm_updates": 5}, "unknown key.*lm_updates")):
        path = _write(tmp_path, lambda p, b=bad: p.update(rounds={"1": b}))
        with pytest.raises(ParamsError, match=match):
            load_params(path)


@pytest.mark.parametrize("key, value, message", [
    ("agg", "median", "agg must be one of avg, sum, soft_max, soft_min; got 'median'"),
    ("squash", "tanh", "squash must be one of soft_clamp, sigmoid; got 'tanh'"),
])
def test_an_unknown_guidance_name_fails_when_params_are_read(tmp_path, key, value, message):
    from conftest import REPO

    from ptg.config import ParamsError
    from ptg.config import load as load_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["fit_guidance"][key] = value
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=rf"p.yaml: fit_guidance: {message}"):
        load_params(tmp_path / "p.yaml")


def test_preference_prompts_follow_the_data_template_unless_set(tmp_path):
    """preferences.prompt_template null reads preference inputs with data.prompt_template, the prompts the pipeline
    writes (editing one cannot leave the other behind); a template of its own is kept."""
    from ptg.config import load as load_params

    path = _write(tmp_path, lambda p: p["data"].update(prompt_template="Sum up:\n{input}"))
    assert load_params(path).preferences.prompt_template == "Sum up:\n{input}"
    path = _write(tmp_path, lambda p: p["preferences"].update(prompt_template="Q: {input}"))
    assert load_params(path).preferences.prompt_template == "Q: {input}"
    with pytest.raises(ValueError, match="preferences.prompt_template is null.*config.load"):
        PreferencesParams().prompt("def f(): pass")  # read without config.load: a clear error, not a crash
    path = _write(tmp_path, lambda p: p["preferences"].update(prompt_template="no placeholder"))
    with pytest.raises(ParamsError, match="prompt_template must contain"):
        load_params(path)
