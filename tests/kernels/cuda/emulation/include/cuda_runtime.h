// Host emulation stand-in (tests/cuda_emulation): see mmloss_emulation.h.
#pragma once
#include "mmloss_emulation.h"
