"""Checkpoints written atomically, resume, and the saved models.

Layout under the run's output directory:
    checkpoints/step-000125/   DeepSpeed engine state (model, optimizer partitions, scheduler),
                               client state (data position, best score), rng-rank<r>.pt and
                               layout.json (ZeRO stage and world size: a resume must match them)
    checkpoints/latest         symlink -> step-000125 (replaced atomically)
    model-step-000125/         a saved model: encoder/ (transformers save_pretrained + tokenizer)
                               and heads.safetensors (pooler and grounding heads)
    best                       symlink -> the model with the best STS-B dev score
    last                       symlink -> the model at the end of training

Every directory is written under a temporary name and renamed once complete; a symlink is
switched with os.replace. A run killed at any moment leaves the previous checkpoint and
models intact; temporary leftovers are removed when the run resumes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from train.config import ConfigError

TMP_PREFIX = ".tmp-"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _point(link: Path, target: str) -> None:
    """Make symlink `link` point to `target` (relative), atomically."""
    tmp = link.with_name(TMP_PREFIX + link.name)
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fd = os.open(link.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a completed temporary directory to its final name."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def rng_state() -> Dict[str, Any]:
    """This process's random generators (torch CPU and CUDA, numpy, random)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _layout(engine) -> Dict[str, int]:
    """What a checkpoint's optimizer state depends on: the ZeRO stage and the world size."""
    return {
        "zero_stage": int(engine.zero_optimization_stage()),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def _check_layout(directory: Path, engine) -> None:
    """A ConfigError saying what differs when `directory` was saved with another ZeRO stage or
    world size than `engine` runs with (checkpoints without layout.json are not checked)."""
    path = directory / "layout.json"
    if not path.exists():
        return
    saved, current = json.loads(path.read_text()), _layout(engine)
    if saved != current:
        raise ConfigError(
            f"{directory}: the checkpoint was saved with ZeRO stage {saved['zero_stage']} on {saved['world_size']} "
            f"rank(s), but this run has deepspeed.zero_stage={current['zero_stage']} on {current['world_size']} "
            "rank(s); resume with the same settings, or start afresh (train.resume=false or another "
            "train.output_dir)"
        )


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(engine, output_dir: Path, step: int, client_state: Dict[str, Any], keep: int) -> Path:
    """Every rank calls this at optimizer step `step`; returns the checkpoint directory.

    DeepSpeed writes the engine state under a temporary tag, each rank adds its RNG state,
    then rank 0 renames the directory, points `latest` at it and removes all but the `keep`
    newest checkpoints.
    """
    root = Path(output_dir) / "checkpoints"
    name = step_name(step)
    tmp_tag = TMP_PREFIX + name
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(rng_state(), root / tmp_tag / f"rng-rank{rank}.pt")
    if rank == 0:
        (root / tmp_tag / "layout.json").write_text(json.dumps(_layout(engine)) + "\n")
    _barrier()
    if rank == 0:
        _publish(root / tmp_tag, root / name)
        _point(root / "latest", name)
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return root / name


def load_latest(engine, output_dir: Path) -> Optional[Dict[str, Any]]:
    """Restore the latest checkpoint into `engine` and this rank's RNG; its client state, or
    None when there is none. Temporary leftovers of an interrupted save are removed."""
    root = Path(output_dir) / "checkpoints"
    latest = root / "latest"
    rank = dist.get_rank() if dist.is_initialized() else 0
    _barrier()
    if rank == 0 and root.is_dir():
        for leftover in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
    _barrier()
    if not latest.is_symlink():
        return None
    tag = os.readlink(latest)
    _check_layout(root / tag, engine)
    path, client_state = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"{root / tag}: DeepSpeed could not load the checkpoint")
    rng_file = root / tag / f"rng-rank{rank}.pt"
    if not rng_file.exists():
        raise RuntimeError(f"{rng_file} missing: resume with the world size of the run that saved it")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def save_model(model, tokenizer, output_dir: Path, step: int, link: str, previous: Optional[str] = None) -> str:
    """Rank 0 only: write model-step-N/ (encoder/ + heads.safetensors), point `link` at it.

    `previous`: the model directory `link` pointed to before; removed unless another link
    still points at it. Returns the model directory's name.
    """
    output_dir = Path(output_dir)
    name = "model-" + step_name(step)
    final = output_dir / name
    tmp = output_dir / (TMP_PREFIX + name)
    if tmp.exists():
        shutil.rmtree(tmp)
    model.encoder.save_pretrained(tmp / "encoder")
    tokenizer.save_pretrained(tmp / "encoder")
    heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    save_file(heads, str(tmp / "heads.safetensors"))
    _publish(tmp, final)
    _point(output_dir / link, name)
    if previous and previous != name:
        still_used = any(os.readlink(p) == previous for p in output_dir.iterdir() if p.is_symlink())
        if not still_used and (output_dir / previous).exists():
            shutil.rmtree(output_dir / previous)
    return name


def load_model_weights(model, directory: Path) -> None:
    """Load a directory written by save_model into `model` (same architecture)."""
    directory = Path(directory)
    encoder = AutoModel.from_pretrained(directory / "encoder", add_pooling_layer=False)
    model.encoder.load_state_dict(encoder.state_dict())
    missing, unexpected = model.load_state_dict(load_file(str(directory / "heads.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise RuntimeError(f"{directory}: heads do not match the model (missing {missing}, unexpected {unexpected})")
