#!/usr/bin/env bash
# Installs into the environment of PYTHON, with uv, exactly the versions constraints.txt pins, and torch's CPU build
# (torch==<pin>+cpu, so no CUDA build can come in): from a folder of wheels pip is configured with where the machine
# has one (global.find-links holding a torch-*+cpu wheel), else from PyTorch's CPU index. Then `uv pip check`.
# A CUDA machine installs its torch build first (README "Set-up") and runs `uv pip install -c constraints.txt ...`.
# Usage: scripts/install.sh PYTHON REQUIREMENT... (e.g. scripts/install.sh .venv/bin/python -e '.[dev]')
set -euo pipefail
python=${1:?usage: install.sh PYTHON REQUIREMENT...}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
uv=$(dirname "$python")/uv
[ -x "$uv" ] || uv=$(command -v uv) || { echo "install.sh: uv not found beside $python nor on PATH (pip install uv)" >&2; exit 1; }
torch="torch==$(sed -n 's/^torch==//p' "$here/constraints.txt")+cpu"
wheels=$(python3 -m pip config get global.find-links 2>/dev/null || true)
if [ -n "$wheels" ] && compgen -G "$wheels/torch-*+cpu-*.whl" > /dev/null; then
  from=(--find-links "$wheels")
else
  from=(--index https://download.pytorch.org/whl/cpu)
fi
"$uv" pip install --quiet --python "$python" "${from[@]}" -c "$here/constraints.txt" "$torch" "$@"
"$uv" pip check --python "$python"
