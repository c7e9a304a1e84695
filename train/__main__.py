"""`python -m train --config train/configs/<method>.yaml [--override key=value ...]`
`python -m train --preset demo [--method simcse|mcse|mcseo|kdmcse] [--override ...]`
`python -m train --config ... --seeds 0,1,2,3,4`: one run per seed under <output_dir>/seed-<s>,
then <output_dir>/seeds.md and seeds.json: mean ± std per STS task (MCSE reports 5 seeds' mean).

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


def parse_seeds(text: str) -> List[int]:
    """ "0,1,2" -> [0, 1, 2]; distinct integers or a ConfigError naming --seeds."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2,3,4") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed appears twice")
    return seeds


def run_seeds(config, seeds: List[int]) -> Path:
    """Train `config` once per seed into <output_dir>/seed-<s>; rank 0 writes seeds.md and
    seeds.json (train.report.write_seeds_report) from each run's "after" STS scores."""
    import dataclasses

    from train.report import write_seeds_report
    from train.trainer import train

    root = Path(config.train.output_dir)
    results = {}
    for seed in seeds:
        run = dataclasses.replace(
            config, train=dataclasses.replace(config.train, seed=seed, output_dir=str(root / f"seed-{seed}"))
        )
        results[seed] = train(run)["results"].get("after")
    if int(os.environ.get("RANK", "0")) == 0:
        missing = [s for s, r in results.items() if not r]
        if missing:
            raise ConfigError(f"--seeds: runs {missing} have no STS scores after training (train.eval_after=false?)")
        write_seeds_report(root, results)
    return root / "seeds.md"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="a YAML file (train/configs/<method>.yaml)")
    source.add_argument("--preset", choices=("demo",), help="demo: the embedded CPU demo, nothing to download")
    parser.add_argument("--method", choices=METHODS, default="mcseo", help="the demo's method (default mcseo)")
    parser.add_argument(
        "--override",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. train.max_steps=100 loss.vl_weight=0.1 (keys: --list-keys)",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="one run per seed (train.seed), then a mean ± std report, e.g. 0,1,2,3,4",
    )
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

        if args.seeds is None:
            train(config)
        else:
            run_seeds(config, parse_seeds(args.seeds))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # stopped before any non-finite state was saved
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
