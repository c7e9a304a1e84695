"""CPU benchmark of the integrations against their peers: sentence-transformers 6.2's
MultipleNegativesRankingLoss (one hard negative), MultipleNegativesSymmetricRankingLoss,
CachedMultipleNegativesRankingLoss's loss stage, and open-clip-torch 3.3's ClipLoss, each
against its mmloss drop-in on the same random embeddings: one forward+backward, time (median
of `--repeats`) and peak extra memory, each measurement in a fresh process (bench/harness.py's
high-water-mark method).

    python -m bench.integrations_bench [--sizes 1024 2048 4096] [--width 768] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from bench.harness import reset_peak, status_bytes

CASES = ("mnrl_hard_negative", "mnsrl", "cached_mnrl_loss_stage", "clip_loss")
IMPLS = ("peer", "mmloss")
CACHED_MINI_BATCH = 32  # sentence-transformers' default mini_batch_size (its loss-stage chunk)


def _ranking(case: str, impl: str, batch: int, width: int) -> Tuple[List[torch.Tensor], Callable[[], None]]:
    from sentence_transformers.sentence_transformer import losses as st

    from mmloss.integrations import sentence_transformers as ml

    lib = st if impl == "peer" else ml
    columns = 3 if case == "mnrl_hard_negative" else 2
    inputs = [torch.randn(batch, width, requires_grad=True) for _ in range(columns)]
    if case == "cached_mnrl_loss_stage":
        model = torch.nn.Sequential(torch.nn.Identity())  # the loss stage never calls it
        loss = lib.CachedMultipleNegativesRankingLoss(model, mini_batch_size=CACHED_MINI_BATCH)
        reps = [list(torch.split(x, CACHED_MINI_BATCH)) for x in inputs]
        return inputs, lambda: loss.calculate_loss(reps, None, with_backward=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cls = lib.MultipleNegativesSymmetricRankingLoss if case == "mnsrl" else lib.MultipleNegativesRankingLoss
        loss = cls(None)
    return inputs, lambda: loss.compute_loss_from_embeddings(inputs, None).backward()


def _clip(impl: str, batch: int, width: int) -> Tuple[List[torch.Tensor], Callable[[], None]]:
    from mmloss.integrations.open_clip import ClipLoss
    from tests.integrations.support import open_clip_loss

    loss = open_clip_loss().ClipLoss() if impl == "peer" else ClipLoss()
    image = F.normalize(torch.randn(batch, width), dim=1).requires_grad_()
    text = F.normalize(torch.randn(batch, width), dim=1).requires_grad_()
    scale = torch.tensor(50.0, requires_grad=True)
    return [image, text, scale], lambda: loss(image, text, scale).backward()


def _build(case: str, impl: str, batch: int, width: int):
    return _clip(impl, batch, width) if case == "clip_loss" else _ranking(case, impl, batch, width)


def measure_here(case: str, impl: str, batch: int, width: int, repeats: int) -> Dict[str, float]:
    """In the child: seconds (median of `repeats`) and the extra resident bytes of one step."""
    torch.manual_seed(0)
    _, warm = _build(case, impl, 8, width)
    warm()  # imports, kernels and thread pools before the baseline
    inputs, step = _build(case, impl, batch, width)
    baseline = reset_peak()
    times = []
    for i in range(repeats):
        for x in inputs:
            x.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if i == 0:
            extra = status_bytes("VmHWM") - baseline
    return {"seconds": statistics.median(times), "extra_bytes": extra}


def measure(
    case: str, impl: str, batch: int, width: int, repeats: int, threads: int, timeout: float = 900
) -> Dict[str, float]:
    """`measure_here` in a fresh process; {"error": text} if it fails."""
    cmd = [
        sys.executable,
        "-m",
        "bench.integrations_bench",
        "--child",
        case,
        impl,
        str(batch),
        str(width),
        str(repeats),
        str(threads),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17), "HF_HUB_OFFLINE": "1"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _ratio(ours: float, peer: float) -> str:
    return f"{ours / peer:.2f}" if peer >= 2**20 else "–"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        case, impl, batch, width, repeats, threads = sys.argv[2:8]
        torch.set_num_threads(int(threads))
        print(json.dumps(measure_here(case, impl, int(batch), int(width), int(repeats))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = parser.parse_args()
    print(
        f"# fp32 forward+backward on the CPU, d = {args.width}, {args.threads} threads, "
        f"median of {args.repeats}; extra = peak resident growth of one step (MiB)\n"
    )
    print("| loss | B | peer s | mmloss s | time ratio | peer extra MiB | mmloss extra MiB | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        for batch in args.sizes:
            peer, ours = (measure(case, impl, batch, args.width, args.repeats, args.threads) for impl in IMPLS)
            if "error" in peer or "error" in ours:
                print(f"| {case} | {batch} | {peer.get('error', '')} | {ours.get('error', '')} | | | | |", flush=True)
                continue
            print(
                f"| {case} | {batch} | {peer['seconds']:.3f} | {ours['seconds']:.3f} | "
                f"{ours['seconds'] / peer['seconds']:.2f} | {_mib(peer['extra_bytes'])} | "
                f"{_mib(ours['extra_bytes'])} | "
                f"{_ratio(ours['extra_bytes'], peer['extra_bytes'])} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
