#!/usr/bin/env bash
# The README's test command: set up .venv with the test extras (idempotent) and run the suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or a file path.
# LM_JAX_TEST_WORKERS (default 2) pytest-xdist workers, whole files per worker (module fixtures
# are built once); 0 runs in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
workers=${LM_JAX_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
