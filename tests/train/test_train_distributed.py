"""Two CPU processes (gloo, ZeRO-2, global negatives on by default) train a tiny random BERT a
few steps with every method; the ranks end with the same finite weights, which moved."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")

from tests.train.support import small_settings, tiny_bert  # noqa: E402
from train.config import METHODS, build_config  # noqa: E402
from train.demo_data import write_demo_data  # noqa: E402
from train.presets import CONFIGS  # noqa: E402


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        HF_HUB_OFFLINE="1",
    )
    from train.trainer import Trainer

    root = Path(root)
    out = {}
    for method in METHODS:
        settings = small_settings(root / method, root / "bert", root / "data")
        trainer = Trainer(build_config(CONFIGS / f"{method}.yaml", base=settings))
        initial = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}
        summary = trainer.run()
        final = {k: v.detach().clone() for k, v in trainer.engine.module.named_parameters()}
        out[method] = {
            "initial": initial,
            "final": final,
            "negatives": trainer.global_negatives,
            "parts": [line for line in (root / method / "metrics.jsonl").read_text().splitlines()]
            if rank == 0
            else None,
            "steps": summary["steps"],
        }
    torch.save(out, root / f"rank{rank}.pt")


def test_two_ranks_zero2_every_method(tmp_path):
    tiny_bert(tmp_path / "bert")
    write_demo_data(tmp_path / "data", images=40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for method in METHODS:
        a, b = ranks[0][method], ranks[1][method]
        assert a["negatives"] == "gather" and a["steps"] == 3
        for name, value in a["final"].items():
            assert torch.isfinite(value).all(), (method, name)
            torch.testing.assert_close(value, b["final"][name], rtol=0, atol=0, msg=f"{method} {name}: ranks differ")
        moved = [n for n, v in a["final"].items() if not torch.equal(v, a["initial"][n])]
        assert any(n.startswith("encoder.") for n in moved) and "mlp.0.weight" in moved, method
        log = "\n".join(a["parts"])
        expected = {
            "simcse": ["simcse"],
            "mcse": ["mml"],
            "mcseo": ["mml", "object_phrase"],
            "kdmcse": ["intra", "inter_image", "inter_text"],
        }[method]
        assert all(f'"{part}"' in log for part in expected), (method, log)
        if method != "simcse":  # a caption batch trained the heads
            assert {"ground.0.weight"} <= set(moved), method
