"""Evaluation CLI: `python -m train.evaluate sts --model DIR --data DIR [--pooling] [--batch-size] [--device]`.

`sts` prints the STS Markdown table (train.sts) for a transformers model directory;
`retrieval --pairs FILE` prints Recall@K of a pairs file (train.retrieval). `--json FILE`
also writes the scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

from train.datasets import senteval_dir
from train.encoders import POOLINGS, TransformersEncoder
from train.report import retrieval_table
from train.retrieval import DEFAULT_KS, evaluate_pairs_file
from train.sts import ALL_TASKS, evaluate_sts, sts_table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sts = sub.add_parser("sts", help="STS12-16, STS-B and SICK-R Spearman x 100")
    sts.add_argument("--model", required=True, type=Path, help="transformers model directory")
    sts.add_argument(
        "--data",
        type=Path,
        default=None,
        help="SentEval data/downstream directory (STS/, SICK/); default: MMLOSS_DATA, else the bundled copy",
    )
    sts.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=None,
        help="default: mean when the directory is a sentence-transformers model with mean pooling, else cls",
    )
    sts.add_argument("--batch-size", type=int, default=128)
    sts.add_argument("--max-length", type=int, default=256)
    sts.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    sts.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=list(ALL_TASKS))
    sts.add_argument("--name", default=None, help="row name in the table (default: the model directory's name)")
    sts.add_argument("--json", type=Path, default=None, help="also write {name: scores} here")
    retrieval = sub.add_parser("retrieval", help="image-text Recall@K of a pairs file")
    retrieval.add_argument("--pairs", required=True, type=Path, help="torch.save'd dict image, text, image_id")
    retrieval.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS))
    retrieval.add_argument("--name", default=None, help="row name in the table (default: the file's name)")
    retrieval.add_argument("--json", type=Path, default=None, help="also write {name: recalls} here")
    args = parser.parse_args(argv)

    if args.command == "retrieval":
        results = {args.name or args.pairs.stem: evaluate_pairs_file(args.pairs, args.ks)}
        print(retrieval_table(results), end="")
    else:
        results = _sts(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _sts(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    pooling = args.pooling or detect_pooling(args.model)
    encoder = TransformersEncoder(
        args.model, pooling=pooling, batch_size=args.batch_size, max_length=args.max_length, device=args.device
    )
    results = {args.name or args.model.resolve().name: evaluate_sts(encoder, senteval_dir(args.data), args.tasks)}
    print(sts_table(results), end="")
    return results


def detect_pooling(model_dir: Path) -> str:
    """ "mean" or "cls" from a sentence-transformers directory's 1_Pooling/config.json, else "cls"."""
    config = model_dir / "1_Pooling" / "config.json"
    if not config.is_file():
        return "cls"
    cfg = json.loads(config.read_text())
    mode = cfg.get("pooling_mode")
    if mode in POOLINGS:
        return mode
    return "mean" if cfg.get("pooling_mode_mean_tokens") else "cls"


if __name__ == "__main__":
    raise SystemExit(main())
