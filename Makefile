# ptg: `make setup` once, then `make test`, `make quick` (tiny pipeline, < 3 min) or `make run` (the default).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test quick run lint clean

setup: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml constraints.txt scripts/install_wordnet.sh
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	bash scripts/install_wordnet.sh .venv
	touch $@

test: $(VENV_STAMP)
	$(PY) -m pytest -q

lint: $(VENV_STAMP)
	.venv/bin/ruff check src stages flows tests

clean:
	rm -rf .venv
