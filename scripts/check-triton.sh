#!/usr/bin/env bash
# Compiles every shipped Triton kernel and config for sm_80/sm_90 with another Triton release
# (default 3.6.0, the GPU machine's), in a venv that shares this machine's other packages:
#   bash scripts/check-triton.sh [VERSION]
# Only the compile-only test runs: Triton 3.6's interpreter does not work with numpy >= 2.4.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${1:-3.6.0}"
venv="${TMPDIR:-/tmp}/mmloss-triton-$version"
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet --no-deps "triton==$version"
cd "$root"
TRITON_CACHE_DIR="$venv/cache" "$venv/bin/python" -m pytest -q -s tests/kernels/triton/test_triton_compile.py -p no:cacheprovider
