"""KDMCSELoss with global negatives under DeepSpeed ZeRO-1/2 on CPU (gloo, 2 processes).

A toy model (text and image heads, a learnable temperature) is trained two steps with SGD
on an uneven split of one batch (3 + 5 captions). Checked: each step runs one forward and one
backward of the loss, and the parameters after DeepSpeed's averaged updates equal those of
one process training on the whole batch (the gradient convention of mmloss.distributed).
Skipped when DeepSpeed is not installed.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

pytest.importorskip("deepspeed")

from mmloss.losses import KDMCSELoss  # noqa: E402

ROWS = (3, 5)
STEPS = 2
LR = 1e-3


class Toy(nn.Module):
    """Text head for the views and grounded views, image/text target heads, the loss."""

    def __init__(self, global_negatives=None):
        super().__init__()
        torch.manual_seed(0)
        self.text = nn.Linear(12, 8).double()
        self.ground = nn.Linear(8, 6).double()
        self.image = nn.Linear(10, 6).double()
        self.caption = nn.Linear(10, 6).double()
        # shape (1,): DeepSpeed cannot broadcast a 0-dim parameter
        temperature = nn.Parameter(torch.tensor([0.05], dtype=torch.float64))
        self.loss = KDMCSELoss(temperature, backend="reference", global_negatives=global_negatives)
        self.calls = 0

    def forward(self, x1, x2, image_features, text_features):
        self.calls += 1
        z1, z2 = self.text(x1), self.text(x2)
        p1, p2 = self.ground(torch.tanh(z1)), self.ground(torch.tanh(z2))
        v, t = self.image(image_features), self.caption(text_features)
        return self.loss(z1, z2, p1, p2, v, t, image_features, text_features).total


def _batch():
    g = torch.Generator().manual_seed(1)
    n = sum(ROWS)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    image = torch.randn(n, 10, generator=g, dtype=torch.float64)
    return (
        x + 0.1 * torch.randn(n, 12, generator=g, dtype=torch.float64),
        x + 0.1 * torch.randn(n, 12, generator=g, dtype=torch.float64),
        image,
        image + 0.5 * torch.randn(n, 10, generator=g, dtype=torch.float64),
    )


def _single_process():
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(*_batch()).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import deepspeed

    # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce at start (a minute or
    # more); it is a speed-up beside gloo, not needed here.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    start = sum(ROWS[:rank])
    local = [x[start : start + ROWS[rank]] for x in _batch()]
    results = {}
    for stage, mode in ((1, "gather"), (2, "ring")):
        model = Toy(global_negatives=mode)
        backward_calls = []
        model.text.weight.register_hook(lambda grad: backward_calls.append(1))
        config = {
            "train_micro_batch_size_per_gpu": ROWS[rank],
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
        }  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
        )
        for _ in range(STEPS):
            loss = engine(*local)
            engine.backward(loss)
            engine.step()
        results[stage] = {
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "forwards": model.calls,
            "backwards": len(backward_calls),
        }
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_zero_stages_match_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2)
    initial = {k: v.detach() for k, v in Toy().named_parameters()}
    expected = {k: v - initial[k] for k, v in _single_process().items()}  # the updates
    assert float(expected["loss.temperature"].abs()) > 1e-4  # the temperature is learnt
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for stage in (1, 2):
            got = results[stage]
            assert got["forwards"] == STEPS and got["backwards"] == STEPS, (stage, got["forwards"], got["backwards"])
            for name, update in expected.items():
                # The ZeRO path agrees to ~1e-8 only (fp32-level rounding of the float64
                # parameters somewhere in DeepSpeed): compare the updates to 1e-3 relative; a
                # wrong gradient scale across ranks would be off by a factor of 2.
                torch.testing.assert_close(
                    got["params"][name] - initial[name],
                    update,
                    atol=1e-7,
                    rtol=1e-3,
                    msg=lambda m: f"rank {rank} ZeRO-{stage} {name}: {m}",
                )
