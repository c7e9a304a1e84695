#!/usr/bin/env bash
# The main job on its embedded default: installs everything, then trains the demo (MiniLM
# on generated image-caption scenes and the SNLI sentences, MCSEO, on the CPU, a few minutes)
# and prints its STS evaluation before and after. Extra arguments go to `python -m train`
# (e.g. --method kdmcse).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
export HF_HUB_OFFLINE=1
python -m train --preset demo "$@"
