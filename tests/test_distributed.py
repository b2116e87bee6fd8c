"""Data-parallel train_lm and fit_guidance through accelerate's DDP: two processes on gloo (`accelerate launch
--multi_gpu --num_processes 2`, on the CPU) take the same updates as one process on the same global batch, with a
guidance weighting the tokens, batches that split unevenly between the ranks and references of different lengths
(so a per-rank mean, averaged over ranks, would differ), for both normalisations of weighted MLE, for the
baseline's uniform weights, for LoRA adapters, for the guidance's ListMLE and for the policy-gradient arms (on
samples that depend on the example alone); under REINFORCE with the sampler (each rank samples its own share) and
under the placebo credit the ranks stay in step."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).parent
VENV_BIN = Path(sys.executable).parent

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from safetensors.torch import save_file
    from conftest import EOS, PAD, tiny_llama
    from test_guidance_train import guidance_for
    from ptg.lm import distributed
    from ptg.lm.train import Example, TrainConfig, train_lm

    distributed.init_from_env()
    out = sys.argv[1]
    # References of 1 to 7 tokens: the ranks' shares of a micro-batch hold different numbers of tokens; 13 of them
    # in micro-batches of 3 leave one micro-batch of 1 per epoch, which one rank trains alone (the other's shard is
    # empty); 5 updates cover the epoch.
    examples = [Example([2, 3 + i % 5, 4 + i % 7], [5 + (i * j) % 9 for j in range(1 + i % 7)] + [EOS])
                for i in range(13)]
    histories = {"world": distributed.rank_and_world()[1],
                 "replica": type(distributed.replicate(tiny_llama(0))).__name__}  # DDP through accelerate
    for name, normalize, guided in (("batch", "batch", True), ("sequence", "sequence", True),
                                    ("uniform", "batch", False)):
        torch.manual_seed(0)
        guidance = guidance_for(tiny_llama(1)) if guided else None
        if guidance is not None:  # a head that tells tokens apart (the initial one gives all the same reward)
            for layer in (guidance.head[0], guidance.head[2]):
                torch.nn.init.normal_(layer.weight, std=0.5)
        model = tiny_llama(0)
        cfg = TrainConfig(lr=0.5, batch_size=3, max_updates=5, normalize=normalize, seed=5)
        # Plain SGD: the weights move by lr x the gradient, so equal weights mean equal gradients (AdamW would
        # turn float-rounding noise in near-zero gradients into steps of up to lr).
        sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        histories[name] = train_lm(model, examples, cfg, PAD, torch.device("cpu"), guidance=guidance,
                                   progress=False, optimizer=sgd)
        if distributed.is_main():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}.safetensors")
    # LoRA adapters (only they train and are synced) on the guided weighted MLE; and REINFORCE on the guidance's
    # token rewards, whose samples each rank draws for its own share (so two processes cannot repeat one's
    # updates; every rank saves its weights, which the synced gradients keep equal).
    from ptg.lm.models import add_lora
    from ptg.lm.sampling import SamplingConfig

    for name, objective in (("lora", "wmle"), ("reinforce", "reinforce")):
        torch.manual_seed(0)
        guidance = guidance_for(tiny_llama(1))
        for layer in (guidance.head[0], guidance.head[2]):
            torch.nn.init.normal_(layer.weight, std=0.5)
        model = tiny_llama(0)
        if name == "lora":
            model = add_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=None, seed=0)
        cfg = TrainConfig(objective=objective, lr=0.5 if name == "lora" else 0.05, batch_size=3, max_updates=5,
                          normalize="sequence", seed=5)
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        histories[name] = train_lm(model, examples, cfg, PAD, torch.device("cpu"), guidance=guidance,
                                   sampling=SamplingConfig(max_new_tokens=4), eos_ids=[EOS], progress=False,
                                   optimizer=sgd)
        rank = distributed.rank_and_world()[0]
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}-rank{rank}.safetensors")
    # The policy-gradient arms. The sampler's draws depend on which examples share its batch, so two processes
    # cannot draw one process's samples; a stand-in sampler whose samples depend on the example alone (lengths 2
    # to 5) and a scorer of the tokens make the updates comparable: DDP must then give one process's update for
    # every credit, for weighted MLE with the term beside it and for REINFORCE whose sequence-level credit is
    # standardised over the whole micro-batch. The placebo's permutations are each rank's own: in step only.
    import ptg.lm.train as train_module

    def drawn_for(model, prompts, sampling, *args, **kwargs):
        return [[[5 + (sum(p) * (j + 2) + t) % 9 for t in range(1 + (sum(p) + j) % 4)] + [EOS]
                 for j in range(sampling.num_samples)] for p in prompts]

    def score(references, drawn):
        return [[(sum(s) % 7) / 7 for s in group] for group in drawn]

    train_module.sample = drawn_for
    for name, objective, credit, coeff in (("pg-sequence", "pg", "sequence", 0.0), ("pg-token", "pg", "token", 0.0),
                                           ("pg-spread", "pg", "spread", 0.0), ("pg-placebo", "pg", "placebo", 0.0),
                                           ("wmle-pg", "wmle", "spread", 0.5),
                                           ("reinforce-sequence", "reinforce", "sequence", 0.0)):
        torch.manual_seed(0)
        guidance = guidance_for(tiny_llama(1))
        for layer in (guidance.head[0], guidance.head[2]):
            torch.nn.init.normal_(layer.weight, std=0.5)
        model = tiny_llama(0)
        cfg = TrainConfig(objective=objective, lr=0.5, batch_size=3, max_updates=5, normalize="sequence", seed=5,
                          pg_credit=credit, pg_coeff=coeff, pg_samples=3, pg_spread=0.5)
        sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        histories[name] = train_lm(model, examples, cfg, PAD, torch.device("cpu"), guidance=guidance,
                                   sampling=SamplingConfig(max_new_tokens=4), eos_ids=[EOS], score=score,
                                   progress=False, optimizer=sgd)
        rank = distributed.rank_and_world()[0]
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}-rank{rank}.safetensors")
    # The guidance: ListMLE over groups of K = 4, 5 groups per update (3 and 2 per rank); 41 groups leave a batch
    # of one group per epoch (an empty shard on one rank).
    from test_guidance_train import synthetic_groups
    from ptg.config import FitConfig
    from ptg.guidance import model as guidance_module
    from ptg.guidance.model import fit_guidance
    # Plain SGD instead of fit_guidance's Adam, for the reason above, from a head that is not near zero (SGD
    # barely moves the reference's 1e-4-gain init).
    guidance_module.torch.optim.Adam = lambda params, **kw: torch.optim.SGD(params, lr=kw.get("lr", 1e-3))
    torch.manual_seed(0)
    guidance = guidance_for(tiny_llama(2))
    for layer in (guidance.head[0], guidance.head[2]):
        torch.nn.init.normal_(layer.weight, std=0.2)
    fit = FitConfig(agg="avg", lr=0.05, batch_groups=5, max_updates=12, eval_every=4, seed=3)
    result = fit_guidance(guidance, synthetic_groups(41, 4, seed=1), synthetic_groups(12, 4, seed=2), fit, PAD,
                          torch.device("cpu"), progress=False)
    histories["guidance"] = result.history
    if distributed.is_main():
        save_file({k: v.contiguous() for k, v in guidance.head.state_dict().items()}, f"{out}/guidance.safetensors")
        json.dump(histories, open(f"{out}/history.json", "w"))
''')


FSDP_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from conftest import EOS, PAD, tiny_llama
    from test_guidance_train import guidance_for
    from ptg.lm import distributed
    import ptg.lm.train as train_module
    from ptg.lm.models import save_lm
    from ptg.lm.sampling import SamplingConfig, sample
    from ptg.lm.train import Example, TrainConfig, train_lm

    distributed.init_from_env()
    out = Path(sys.argv[1])
    # 12 examples in micro-batches of 3: every rank trains on 1 or 2 examples of each, of different lengths. The
    # prompts share 9 leading tokens, which one process runs in a pass of their own; a rank of 2 examples would too
    # and a rank of 1 would not, so sharded ranks must not (their forwards are collectives that run in step).
    examples = [Example([2, 3, 4, 5, 6, 7, 8, 9, 10, 3 + i % 5, 4 + i % 7],
                        [5 + (i * j) % 9 for j in range(1 + i % 7)] + [EOS]) for i in range(12)]
    # Plain SGD (see SCRIPT), built by train_lm on the sharded weights.
    train_module.make_optimizer = lambda model, cfg: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    # Only train_lm's policy is sharded: the guidance (replicate without shard) is DDP under an FSDP launch too.
    report = {"world": distributed.rank_and_world()[1], "sharded": distributed.fsdp_requested(),
              "unsharded_replica": type(distributed.replicate(tiny_llama(0))).__name__}
    checkpoints = []

    def validate(model):
        """Greedy decoding of two prompts (the sharded ranks decode in step), and a score that peaks at the
        third checkpoint (update 4 of 5): the best checkpoint is not the last weights."""
        drawn = sample(model, [[2, 3, 4], [2, 5, 6, 7]], SamplingConfig(max_new_tokens=4, temperature=0.0), [EOS],
                       PAD, torch.device("cpu"), progress=False)
        checkpoints.append(drawn)
        return {"val_score": [0.0, 1.0, 3.0, 2.0][len(checkpoints) - 1]}

    # best: validated every 2 updates, the best is update 4 of 5; four: the same run stopped at update 4; last:
    # uniform weights, gradient checkpointing, the last weights.
    for name, guided, eval_every, recompute, updates in (("best", True, 2, False, 5), ("four", True, 0, False, 4),
                                                          ("last", False, 0, True, 5)):
        torch.manual_seed(0)
        guidance = guidance_for(tiny_llama(1)) if guided else None
        if guidance is not None:
            for layer in (guidance.head[0], guidance.head[2]):
                torch.nn.init.normal_(layer.weight, std=0.5)
        model = tiny_llama(0)
        cfg = TrainConfig(lr=0.5, batch_size=3, max_updates=updates, normalize="batch", seed=5,
                          eval_every=eval_every, gradient_checkpointing=recompute)
        report[name] = train_lm(model, examples, cfg, PAD, torch.device("cpu"), guidance=guidance, progress=False,
                                validate=validate if eval_every else None)
        report["sharded_model"] = distributed.is_sharded(model)
        state = distributed.full_state(model)  # every rank: the gather is a collective
        if distributed.is_main():
            save_lm(model, out / name, state if report["sharded_model"] else None)
    report["decoded"] = checkpoints
    for name, cfg in (("objective", TrainConfig(objective="pg", pg_credit="sequence", batch_size=3, max_updates=1)),
                      ("batch_size", TrainConfig(batch_size=1, max_updates=1))):
        try:
            train_lm(tiny_llama(0), examples, cfg, PAD, torch.device("cpu"), progress=False,
                     sampling=SamplingConfig(max_new_tokens=4), eos_ids=[EOS],
                     score=lambda references, drawn: [[0.0] * len(group) for group in drawn])
            report[f"refused_{name}"] = None
        except ValueError as e:
            report[f"refused_{name}"] = str(e)
    if distributed.is_main():
        json.dump(report, open(out / "history.json", "w"))
''')


def _train(tmp_path: Path, name: str, processes: int, script_text: str = SCRIPT,
           launch: tuple[str, ...] = ("--multi_gpu",), timeout: float = 600) -> Path:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / f"{name}.py"
    script.write_text(script_text)
    if processes == 1:
        cmd = [sys.executable, str(script), str(out)]
    else:
        # --main_process_port 0: accelerate takes a free port itself, as it starts the processes
        cmd = [str(VENV_BIN / "accelerate"), "launch", *launch, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", "0", str(script), str(out)]
    src = str(TESTS.parent / "src")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS), src]), "OMP_NUM_THREADS": "1",
                        "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):  # the ranks run in sessions of their own
            child.kill()
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"{cmd} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return _train(tmp, "one", 1), _train(tmp, "two", 2)


@pytest.mark.parametrize("name", ["batch", "sequence", "uniform"])
def test_two_processes_take_the_updates_of_one(runs, name):
    one, two = runs
    assert [json.loads((d / "history.json").read_text())["world"] for d in (one, two)] == [1, 2]
    assert [json.loads((d / "history.json").read_text())["replica"] for d in (one, two)] == [
        "Replica", "DistributedDataParallel"]
    from ptg.lm.train import micro_batches

    lengths = [3 + 1 + i % 7 + 1 for i in range(13)]  # prompt + reference tokens of the script's examples
    drawn = micro_batches(lengths, 3, torch.Generator().manual_seed(5))
    assert 1 in [len(next(drawn)) for _ in range(5)]  # a micro-batch one rank trains alone
    assert_updates_of_one(one, two, f"{name}.safetensors", name)


def assert_updates_of_one(one: Path, two: Path, weights: str, history: str) -> None:
    """The weights ``weights`` that two processes trained moved from the start and equal one process's; the rows
    of their ``history`` agree on the tokens (the whole micro-batch's, summed over ranks) and the metrics."""
    a, b = load_file(one / weights), load_file(two / weights)
    from conftest import tiny_llama

    start = tiny_llama(0).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the updates moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    h1, h2 = (json.loads((d / "history.json").read_text())[history] for d in (one, two))
    for r1, r2 in zip(h1, h2, strict=True):
        assert r2["tokens"] == r1["tokens"]
        for key in ("loss", "nll", "reward", "pg_loss", "pg_score", "grad_norm"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), (history, key, r1["update"])


def test_two_processes_fit_the_guidance_of_one(runs):
    """fit_guidance: each rank scores its share of each batch's groups; the ListMLE curve (train and validation)
    and the fitted head match one process's."""
    one, two = runs
    h1, h2 = (json.loads((d / "history.json").read_text())["guidance"] for d in (one, two))
    assert len(h1) == len(h2) == 13
    for r1, r2 in zip(h1, h2, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "grad_norm"):
            if key in r1:
                # gloo sums the two ranks' gradients in another order than one process's backward does; 12 SGD
                # steps at lr 0.05 carry that float rounding into the loss: measured up to 5.8e-4 relative on a
                # 2-core Xeon (avx512_bf16). 2e-3 bounds it; a per-rank mean averaged over ranks is off by 1.2e-2.
                assert r2[key] == pytest.approx(r1[key], rel=2e-3), (r1["update"], key)
    a, b = load_file(one / "guidance.safetensors"), load_file(two / "guidance.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    assert h1[-1]["val_loss"] < h1[0]["val_loss"] - 0.01  # the head learned something


def test_two_processes_train_lora_adapters_as_one(runs):
    """LoRA (peft) under data parallelism: only the adapters move, and they move as one process moves them."""
    one, two = runs
    a, b = load_file(one / "lora-rank0.safetensors"), load_file(two / "lora-rank0.safetensors")
    h1, h2 = (json.loads((d / "history.json").read_text())["lora"] for d in (one, two))
    from conftest import tiny_llama

    start = {f"base_model.model.{k}": v for k, v in tiny_llama(0).state_dict().items()}
    # The base weights are the untouched tiny model; peft starts lora_B at zero, so a non-zero one has trained.
    assert all(torch.equal(a[k], start[k.replace(".base_layer", "")]) for k in a if "lora_" not in k)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    for r1, r2 in zip(h1, h2, strict=True):
        assert r2["tokens"] == r1["tokens"] and r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    assert h1[-1]["loss"] < h1[0]["loss"]  # the adapters learned


@pytest.mark.parametrize("name", ["pg-sequence", "pg-token", "pg-spread", "wmle-pg", "reinforce-sequence"])
def test_two_processes_take_the_policy_gradient_updates_of_one(runs, name):
    """The policy-gradient term under DDP: each rank samples and scores its own examples, the normalisers (tokens,
    the rms of the credit, the standardisation of REINFORCE's scores) are the whole micro-batch's, and the update
    is one process's on the same samples."""
    one, two = runs
    assert_updates_of_one(one, two, f"{name}-rank0.safetensors", name)


def test_placebo_ranks_stay_in_step(runs):
    _, two = runs
    w0, w1 = (load_file(two / f"pg-placebo-rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_reinforce_ranks_stay_in_step(runs):
    """REINFORCE with token rewards on two ranks: each samples its own share, the summed gradient keeps both ranks'
    weights equal, and the updates moved them."""
    _, two = runs
    w0, w1 = (load_file(two / f"reinforce-rank{r}.safetensors") for r in (0, 1))
    from conftest import tiny_llama

    start = tiny_llama(0).state_dict()
    assert any(not torch.equal(w0[k], start[k]) for k in w0)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    history = json.loads((two / "history.json").read_text())["reinforce"]
    assert len(history) == 5 and all(row["entropy"] > 0 for row in history)


def test_fsdp_trains_saves_and_reloads_as_one_process(tmp_path):
    """The shipped FSDP config (configs/accelerate/fsdp.yaml) on two gloo processes: train_lm shards the policy
    (FSDP2), takes one process's updates on the same global batch, validates in step (greedy decoding through the
    sharded weights), keeps the best checkpoint's shards and puts them back, and rank 0 saves the weights gathered
    from both ranks, which load as an ordinary LM equal to one process's; with gradient checkpointing too. Sampling
    objectives and micro-batches that leave a rank empty are refused, naming the setting."""
    from conftest import tiny_llama

    from ptg.lm.models import load_lm

    config = TESTS.parent / "configs" / "accelerate" / "fsdp.yaml"
    one = _train(tmp_path, "one", 1, FSDP_SCRIPT)
    # Ranks out of step wait on each other's collectives for ever: 3 minutes (15 s here) say so.
    two = _train(tmp_path, "two", 2, FSDP_SCRIPT, ("--config_file", str(config)), timeout=180)
    r1, r2 = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert (r1["world"], r1["sharded"], r1["sharded_model"]) == (1, False, False)
    assert (r2["world"], r2["sharded"], r2["sharded_model"]) == (2, True, True)
    assert (r1["unsharded_replica"], r2["unsharded_replica"]) == ("Replica", "DistributedDataParallel")
    assert r2["decoded"] == r1["decoded"] and len(r1["decoded"]) == 4
    start = tiny_llama(0).state_dict()
    weights = {}
    for name in ("best", "four", "last"):
        for a, b in zip(r1[name], r2[name], strict=True):
            assert b.get("tokens") == a.get("tokens")
            for key in ("loss", "nll", "reward", "grad_norm", "val_score"):
                if key in a:  # one process runs the shared prompt prefix in a pass of its own: other rounding
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (name, key, a["update"])
        w1, w2 = weights[name] = [load_lm(d / name, torch.device("cpu")).state_dict() for d in (one, two)]
        assert w2.keys() == w1.keys() == start.keys()
        assert any(not torch.equal(w1[k], start[k]) for k in w1)  # the updates moved the weights
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-5)
    # What was saved is the best checkpoint (update 4 of 5), put back into the shards: the weights of the run
    # that stopped at update 4.
    assert [row["update"] for row in r1["best"] if "val_score" in row] == [0.0, 2.0, 4.0, 5.0]
    for w_best, w_four in zip(weights["best"], weights["four"], strict=True):
        for k in w_best:
            torch.testing.assert_close(w_best[k], w_four[k], atol=1e-6, rtol=1e-6)
    assert r1["refused_objective"] is r1["refused_batch_size"] is None
    assert r2["refused_objective"].startswith("FSDP: train_lm.objective 'pg'")
    assert "raise train_lm.batch_size (1)" in r2["refused_batch_size"]
