# Sourced by launch/quickstart.sh and tests/run.sh: create (or reuse) .venv in the repo root and
# install the package into it. Reinstalls only when setup.py changed since the last install.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[mgpt4] creating virtualenv at $REPO_ROOT/.venv" >&2
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.mgpt4_installed
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  echo "[mgpt4] installing mgpt4_dist and its dependencies into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e '.[dev]' >&2
  touch "$STAMP"
fi
export PATH="$REPO_ROOT/.venv/bin:$PATH"
