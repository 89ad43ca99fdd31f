#!/usr/bin/env bash
# Idempotent set-up used by `make run` and `make test`:
#   a virtual environment (.venv) if there is none, torch==2.13.0 if no torch is installed
#   (the CPU build that lies on this disk; a bare `torch` would pull a multi-GB CUDA build),
#   this package with its dev extras, and Debian's dataset-fashion-mnist and wordnet-base (the
#   text task) when they are missing.
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

# Debian packages: the dataset, and Chromium + ChromeDriver for the browser test of the MLflow
# UI (that test is skipped, with the reason, where they cannot be installed).
missing=()
[ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ] || missing+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: missing Debian packages (${missing[*]}) and apt-get is not usable as" \
             "root here; Fashion-MNIST then needs --data-dir" >&2
    fi
fi
