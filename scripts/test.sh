#!/usr/bin/env bash
# The README's test command: set up .venv with the test extras (idempotent) and run the suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or a file path.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -q "$@"
