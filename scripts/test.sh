#!/usr/bin/env bash
# Installs everything (scripts/setup-env.sh), lints (ruff), and runs the whole test suite on the
# CPU against the installed wheel.
# Triton kernels run in its interpreter (TRITON_INTERPRET=1); GPU-only tests skip.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
ruff check .
ruff format --check .
export TRITON_INTERPRET=1 MMLOSS_TEST_INSTALLED=1
python -m pytest -q -ra "$@"
