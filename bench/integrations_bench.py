"""CPU benchmark of the integrations against their peers: sentence-transformers 6.2's
MultipleNegativesRankingLoss (one hard negative; and the four directions joint),
MultipleNegativesSymmetricRankingLoss, GISTEmbedLoss with a guide (d_guide = 384, one hard
negative), CachedMultipleNegativesRankingLoss's loss stage, and open-clip-torch 3.3's ClipLoss,
each against its mmloss drop-in on the same random embeddings: one forward+backward, wall time
and process CPU time (medians of `--repeats`) and peak extra memory, each measurement in a fresh
process (bench/harness.py's high-water-mark method). A measurement whose estimated peak exceeds
`--memory-gib` is not run and is marked "does not fit" (the peers' dense B × B matrices; the
peer GISTEmbedLoss's nn.CosineSimilarity makes B × B × d tensors, about 11.5 of them at its
peak with three columns: 9.0 GiB measured at B = 512, d = 768, ~36 GiB at 1,024).

    python -m bench.integrations_bench [--sizes 1024 2048 4096 8192 16384] [--width 768]
        [--threads 2] [--repeats 3] [--cases ...] [--memory-gib 20] [--timeout 3600]
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

CASES = ("mnrl_hard_negative", "mnrl_all_directions", "mnsrl", "gist_guide", "cached_mnrl_loss_stage", "clip_loss")
IMPLS = ("peer", "mmloss")
CACHED_MINI_BATCH = 32  # sentence-transformers' default mini_batch_size (its loss-stage chunk)
GUIDE_WIDTH = 384  # a MiniLM-sized guide
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
_F32 = 4


def estimated_bytes(case: str, impl: str, batch: int, width: int) -> float:
    """A rough upper estimate of one step's peak extra memory: the peers' dense matrices (a few
    live copies of the score matrix: scores, softmax, gradient; GIST's B × B × d products of
    nn.CosineSimilarity, 11.5 of them at the peak measured at B = 256 and 512), mmloss's O(B·d)
    copies of the inputs."""
    if impl == "mmloss" or case == "cached_mnrl_loss_stage":
        return 16 * batch * width * _F32
    columns = {"mnrl_hard_negative": 2, "mnrl_all_directions": 6, "mnsrl": 2, "clip_loss": 2}
    if case == "gist_guide":
        return 12 * batch * batch * width * _F32
    return 5 * columns[case] * batch * batch * _F32


def _ranking(case: str, impl: str, batch: int, width: int, device) -> Tuple[List[torch.Tensor], Callable[[], None]]:
    from sentence_transformers.sentence_transformer import losses as st

    from mmloss.integrations import sentence_transformers as ml

    lib = st if impl == "peer" else ml
    columns = 3 if case in ("mnrl_hard_negative", "mnrl_all_directions") else 2
    inputs = [torch.randn(batch, width, device=device, requires_grad=True) for _ in range(columns)]
    if case == "cached_mnrl_loss_stage":
        model = torch.nn.Sequential(torch.nn.Identity())  # the loss stage never calls it
        loss = lib.CachedMultipleNegativesRankingLoss(model, mini_batch_size=CACHED_MINI_BATCH)
        reps = [list(torch.split(x, CACHED_MINI_BATCH)) for x in inputs]
        return inputs, lambda: loss.calculate_loss(reps, None, with_backward=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if case == "mnsrl":
            loss = lib.MultipleNegativesSymmetricRankingLoss(None)
        else:
            directions = ALL_DIRECTIONS if case == "mnrl_all_directions" else ("query_to_doc",)
            loss = lib.MultipleNegativesRankingLoss(None, directions=directions)
    return inputs, lambda: loss.compute_loss_from_embeddings(inputs, None).backward()


def _clip(impl: str, batch: int, width: int, device) -> Tuple[List[torch.Tensor], Callable[[], None]]:
    from mmloss.integrations.open_clip import ClipLoss
    from tests.integrations.support import open_clip_loss

    loss = open_clip_loss().ClipLoss() if impl == "peer" else ClipLoss()
    image = F.normalize(torch.randn(batch, width, device=device), dim=1).requires_grad_()
    text = F.normalize(torch.randn(batch, width, device=device), dim=1).requires_grad_()
    scale = torch.tensor(50.0, device=device, requires_grad=True)
    return [image, text, scale], lambda: loss(image, text, scale).backward()


def _gist(impl: str, batch: int, width: int, device) -> Tuple[List[torch.Tensor], Callable[[], None]]:
    """GISTEmbedLoss's forward on given (anchor, positive, negative) embeddings and a guide's:
    model and guide are stand-ins with all-MiniLM-L6-v2's tokenizer (the constructor's checks),
    their embedding step patched to return the inputs (tests/integrations/support.py)."""
    from sentence_transformers.sentence_transformer import losses as st
    from transformers import AutoTokenizer

    from mmloss.integrations import sentence_transformers as ml
    from tests.integrations.support import embeddings_as_features
    from train.presets import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model, guide = torch.nn.Module(), torch.nn.Module()
    for stand_in in (model, guide):
        stand_in.tokenizer, stand_in.max_seq_length = tokenizer, 128
    loss = (st if impl == "peer" else ml).GISTEmbedLoss(model, guide)
    inputs = [torch.randn(batch, width, device=device, requires_grad=True) for _ in range(3)]
    guide_inputs = [torch.randn(batch, GUIDE_WIDTH, device=device) for _ in range(3)]
    features = [{"model": x, "guide": g} for x, g in zip(inputs, guide_inputs)]

    def step() -> None:
        with embeddings_as_features(model, guide):
            loss(features, None).backward()

    return inputs, step


def build(case: str, impl: str, batch: int, width: int, device="cpu"):
    """(the step's leaf inputs, the step: one forward+backward) of `case` by `impl` on `device`
    (bench/gpu_steps.py runs these rows on the GPU)."""
    if case == "clip_loss":
        return _clip(impl, batch, width, device)
    if case == "gist_guide":
        return _gist(impl, batch, width, device)
    return _ranking(case, impl, batch, width, device)


def measure_here(case: str, impl: str, batch: int, width: int, repeats: int) -> Dict[str, float]:
    """In the child: wall and CPU seconds (medians of `repeats`) and the extra resident bytes of
    one step."""
    torch.manual_seed(0)
    _, warm = build(case, impl, 8, width)
    warm()  # imports, kernels and thread pools before the baseline
    inputs, step = build(case, impl, batch, width)
    baseline = reset_peak()
    times, cpu_times = [], []
    for i in range(repeats):
        for x in inputs:
            x.grad = None
        start, cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        if i == 0:
            extra = status_bytes("VmHWM") - baseline
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times), "extra_bytes": extra}


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
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument(
        "--memory-gib", type=float, default=20.0, help="skip a measurement whose estimated peak exceeds this"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement (its process)")
    args = parser.parse_args()
    print(
        f"# fp32 forward+backward on the CPU, d = {args.width}, {args.threads} threads, "
        f"median of {args.repeats}; wall and process CPU seconds; extra = peak resident growth of "
        f"one step (MiB); not run where the estimated peak exceeds {args.memory_gib:g} GiB\n"
    )
    print(
        "| loss | B | peer s | mmloss s | time ratio | peer CPU s | mmloss CPU s | CPU ratio "
        "| peer extra MiB | mmloss extra MiB | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        for batch in args.sizes:
            row = {}
            for impl in IMPLS:
                need = estimated_bytes(case, impl, batch, args.width) / 2**30
                if need > args.memory_gib:
                    row[impl] = {"error": f"does not fit (~{need:.0f} GiB)"}
                else:
                    row[impl] = measure(case, impl, batch, args.width, args.repeats, args.threads, args.timeout)
            print(_row(case, batch, row["peer"], row["mmloss"]), flush=True)


def _cells(result: Dict[str, float], key: str, fmt: str) -> str:
    return result.get("error", "") if "error" in result else format(result[key], fmt)


def _row(case: str, batch: int, peer: Dict[str, float], ours: Dict[str, float]) -> str:
    both = "error" not in peer and "error" not in ours
    time_ratio = f"{ours['seconds'] / peer['seconds']:.2f}" if both else ""
    cpu_ratio = f"{ours['cpu_seconds'] / peer['cpu_seconds']:.2f}" if both else ""
    memory_ratio = _ratio(ours["extra_bytes"], peer["extra_bytes"]) if both else ""
    mib = lambda r: r.get("error", "") if "error" in r else _mib(r["extra_bytes"])  # noqa: E731
    return (
        f"| {case} | {batch} | {_cells(peer, 'seconds', '.3f')} | {_cells(ours, 'seconds', '.3f')} | {time_ratio} | "
        f"{_cells(peer, 'cpu_seconds', '.3f')} | {_cells(ours, 'cpu_seconds', '.3f')} | {cpu_ratio} | "
        f"{mib(peer)} | {mib(ours)} | {memory_ratio} |"
    )


if __name__ == "__main__":
    main()
