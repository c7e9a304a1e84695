"""Shared pieces of the integration tests (no tests here): the installed peers, a tiny
SentenceTransformer, and the comparison against a peer class."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Callable, List

import torch

OPEN_CLIP_VERSION = "3.3.0"
FLOOR = 1e-3  # magnitude below which float64 errors are compared absolutely


def open_clip_loss():
    """open_clip.loss of the installed open-clip-torch 3.3.0: a clean import where the package
    imports (it needs torchvision), else its loss module loaded from its file (torch only)."""
    version = importlib.metadata.version("open_clip_torch")
    assert version == OPEN_CLIP_VERSION, f"the tests compare with open-clip-torch {OPEN_CLIP_VERSION}, found {version}"
    try:
        return importlib.import_module("open_clip.loss")
    except ImportError:
        pass
    if "open_clip_loss_file" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")  # finds the package without running it
        path = Path(spec.submodule_search_locations[0]) / "loss.py"
        module_spec = importlib.util.spec_from_file_location("open_clip_loss_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        sys.modules["open_clip_loss_file"] = module
    return sys.modules["open_clip_loss_file"]


def tiny_sentence_transformer(directory: Path):
    """A SentenceTransformer (mean pooling) over tests/train's tiny random BERT."""
    from sentence_transformers import SentenceTransformer

    from tests.train.support import tiny_bert

    if not (directory / "config.json").exists():
        tiny_bert(directory)
    return SentenceTransformer(str(directory), device="cpu")


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max())


def assert_matches_peer(run: Callable[[str, torch.dtype], List[torch.Tensor]], names: List[str]) -> None:
    """`run(impl, dtype)` -> [loss, gradients...] for impl "peer" or "mmloss", on inputs exactly
    representable in float32.

    float64: mmloss equals the peer to 1e-10 relative to each result's largest magnitude (at
    least FLOOR: a gradient that is 0 in exact arithmetic, as an attention key bias's, is
    rounding noise on both sides). float32: the contract's bar (tests/cases.py) with the peer in the
    role of eager PyTorch: against the float64 peer, at most 2x the peer's own float32 error
    plus 1e-6 (relative for the loss) and half an ulp of the result's magnitude."""
    exact, ours = run("peer", torch.float64), run("mmloss", torch.float64)
    assert len(exact) == len(ours) == len(names)
    for name, got, want in zip(names, ours, exact):
        assert got.dtype == torch.float64, f"{name}: {got.dtype}"
        scale = max(float(want.abs().max()), FLOOR)
        assert _error(got, want) <= 1e-10 * scale, f"{name}: float64 error {_error(got, want) / scale:.3g} (relative)"
    peer, ours = run("peer", torch.float32), run("mmloss", torch.float32)
    for i, (name, got, theirs, want) in enumerate(zip(names, ours, peer, exact)):
        scale = float(want.abs().max())
        slack = 1e-6 * max(1.0, scale) if i == 0 else 1e-6
        bar = 2 * _error(theirs, want) + slack + 0.5 * torch.finfo(torch.float32).eps * scale
        assert _error(got, want) <= bar, f"{name}: float32 error {_error(got, want):.3g} > bar {bar:.3g}"


@contextlib.contextmanager
def embeddings_as_features(model, guide):
    """Feature dicts {"model": (B, d), "guide": (B, dg)} that `model` and `guide` "embed" to
    those tensors, in sentence-transformers' GISTEmbedLoss module and mmloss's (their
    embed_columns patched): the losses' forward runs on given embeddings."""
    from sentence_transformers.sentence_transformer.losses import gist_embed

    from mmloss.integrations import sentence_transformers as ml

    def embed(which, features):
        assert which is model or which is guide
        return [f["model" if which is model else "guide"] for f in features]

    modules = (gist_embed, ml)
    saved = [m.embed_columns for m in modules]
    try:
        for m in modules:
            m.embed_columns = embed
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.embed_columns = fn
