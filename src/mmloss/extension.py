"""Loading the compiled extension mmloss._C, refusing one built against another torch.

A C++ extension links against one torch's libraries; loaded beside another it fails with an
undefined symbol, or worse, loads and misbehaves. The build writes `_C_build.json` (the torch
version it compiled against) beside `_C`; `load()` compares it with the running torch first.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch

BUILD_RECORD = Path(__file__).with_name("_C_build.json")
REBUILD = "rebuild it: pip install --no-build-isolation ."


def built_against() -> Optional[str]:
    """The torch version _C was compiled against, or None when no build record exists."""
    if not BUILD_RECORD.is_file():
        return None
    return json.loads(BUILD_RECORD.read_text()).get("torch")


@functools.lru_cache(maxsize=None)
def load() -> Tuple[Optional[ModuleType], Optional[str]]:
    """(mmloss._C, None), or (None, why not): not built, built for another torch, or failing to load."""
    built = built_against()
    if built is not None and built != torch.__version__:
        return None, f"built against torch {built} but torch {torch.__version__} is installed; {REBUILD}"
    try:
        from mmloss import _C
    except ModuleNotFoundError as exc:
        if exc.name != "mmloss._C":
            raise
        return None, f"not built ({REBUILD})"
    except ImportError as exc:  # built, but broken: say so instead of hiding it
        versions = f"built against torch {built or 'unknown'}, running torch {torch.__version__}"
        return None, f"built but failed to load ({versions}): {exc}"
    return _C, None
