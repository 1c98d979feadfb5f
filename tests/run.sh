#!/usr/bin/env bash
# The whole test suite (unit, distributed, e2e) in one pytest run.
#   bash tests/run.sh [pytest args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/_venv.sh"
exec .venv/bin/python -m pytest tests "$@"
