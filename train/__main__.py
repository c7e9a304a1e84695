"""`python -m train --config train/configs/<method>.yaml [--override key=value ...]`
`python -m train --preset demo [--method simcse|mcse|mcseo|kdmcse] [--override ...]`

The same command runs under torchrun or the deepspeed launcher (one process per device).
Exit status: 0 done, 2 a configuration or data error, 3 stopped on a non-finite loss, gradient
or weight (train.guard).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from train.config import METHODS, ConfigError, build_config, parse_override, valid_keys
from train.data import DataError
from train.guard import NonFiniteError


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="a YAML file (train/configs/<method>.yaml)")
    source.add_argument("--preset", choices=("demo",), help="demo: the embedded CPU demo, nothing to download")
    parser.add_argument("--method", choices=METHODS, default="mcseo", help="the demo's method (default mcseo)")
    parser.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="e.g. train.max_steps=100 loss.vl_weight=0.1 (keys: --list-keys)")
    parser.add_argument("--list-keys", action="store_true", help="print every configuration key and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    if args.list_keys:
        print("\n".join(valid_keys()))
        return 0
    if not (args.config or args.preset):
        parser.error("one of --config or --preset is required")
    if args.preset:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never downloads
    try:
        overrides = [parse_override(o) for o in args.override]
        if args.preset:
            from train.presets import CONFIGS, demo_settings, ensure_demo_data

            config = build_config(CONFIGS / f"{args.method}.yaml", overrides, base=demo_settings(args.method))
            if config.method != "simcse":
                ensure_demo_data(Path(config.data.pairs))
        else:
            config = build_config(args.config, overrides)
        from train.trainer import train

        train(config)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # stopped before any non-finite state was saved
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
