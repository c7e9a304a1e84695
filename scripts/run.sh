#!/usr/bin/env bash
# The main job on its embedded default: installs everything, then prints the CPU benchmark
# table (mmloss's compiled backend vs eager PyTorch, fp32, N up to 65,536). Extra arguments
# go to `python -m bench` (e.g. --quick).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
python -m bench "$@"
