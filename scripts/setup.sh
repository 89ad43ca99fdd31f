#!/usr/bin/env bash
# Idempotent set-up used by `make run` and `make test`:
#   a virtual environment (.venv) if there is none, torch==2.13.0 if no torch is installed
#   (the CPU build that lies on this disk; a bare `torch` would pull a multi-GB CUDA build),
#   this package with its dev extras, and Debian's dataset-fashion-mnist when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
FASHION_DIR=/usr/share/datasets/fashion-mnist

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0 (CPU build)"
    "${PIP[@]}" install torch==2.13.0
fi

stamp="$VENV/.tdsearch-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing tdsearch and its dependencies"
    "${PIP[@]}" install -e ".[dev]"
    touch "$stamp"
fi

if [ ! -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian's dataset-fashion-mnist"
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: Fashion-MNIST is missing and apt-get is not usable as root here;" \
             "install dataset-fashion-mnist or pass --data-dir" >&2
    fi
fi
