"""Nothing falls back silently: `backend="auto"` warns once per reason when it has to run the
dense reference, the backend that ran is recorded per thread (a context variable), and the
distributed path resolves `auto` the same way (with the number of keys its kernel sees)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.distributed as dist

import mmloss
from mmloss import backends

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts with no reason warned about yet."""
    monkeypatch.setattr(backends, "_warned", set())


def _resolve_warnings(*args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = backends.resolve(*args)
    return name, [str(w.message) for w in caught]


def test_auto_on_cuda_float64_warns_once_and_runs_the_reference():
    name, first = _resolve_warnings("auto", CUDA, torch.float64, 100)
    assert name == "reference"
    assert len(first) == 1 and "dense reference" in first[0] and "float64" in first[0]
    name, second = _resolve_warnings("auto", CUDA, torch.float64, 100)
    assert name == "reference" and second == []  # once per reason


def test_auto_without_triton_warns_naming_it(monkeypatch):
    monkeypatch.setattr(backends, "_triton_error", lambda: "Triton is not installed (No module named 'triton')")
    name, caught = _resolve_warnings("auto", CUDA, torch.bfloat16, 100)
    assert name == "reference" and len(caught) == 1 and "Triton is not installed" in caught[0]
    # another reason warns again, the same one does not
    _, other = _resolve_warnings("auto", CUDA, torch.float64, 100)
    _, again = _resolve_warnings("auto", CUDA, torch.bfloat16, 100)
    assert len(other) == 1 and "float64" in other[0] and again == []


def test_auto_with_triton_on_cuda_is_silent(monkeypatch):
    monkeypatch.setattr(backends, "_triton_error", lambda: None)
    name, caught = _resolve_warnings("auto", CUDA, torch.float16, 100)
    assert name == "triton" and caught == []


def test_auto_on_cpu_without_the_extension_warns_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(backends, "_load_extension", lambda: (None, "not built (pip install .)"))
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.warns(UserWarning, match=r"dense reference .*mmloss\._C is not built"):
        loss = mmloss.contrastive_loss(q, k)
    assert mmloss.last_backend() == "reference"
    torch.testing.assert_close(loss, mmloss.contrastive_loss(q, k, backend="reference"))


def test_the_backend_that_ran_is_recorded_per_thread():
    """Two threads in lockstep, each with its own backend: each reads its own, and a thread
    that has not called reads None."""
    q, k = torch.randn(5, 4), torch.randn(6, 4)
    barrier, seen = threading.Barrier(2), {}

    def call(backend):
        mmloss.contrastive_loss(q, k, backend=backend)
        barrier.wait()  # both have called before either reads
        seen[backend] = mmloss.last_backend()

    threads = [threading.Thread(target=call, args=(b,)) for b in ("reference", "cpu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"reference": "reference", "cpu": "cpu"}
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(mmloss.last_backend()))
    thread.start()
    thread.join()
    assert fresh == [None]


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["gather", "ring"])
def test_global_negatives_resolve_auto_as_one_process(one_rank_group, monkeypatch, mode):
    """The distributed path goes through the same resolution (auto table included: it gets the
    number of keys a kernel call sees), warns the same way, and records what ran."""
    calls = []
    resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda *args: calls.append(args) or resolve(*args))
    q, k = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    loss = mmloss.contrastive_loss(q, k, global_negatives=mode)
    assert calls == [("auto", q.device, torch.float64, 7)]
    assert mmloss.last_backend() == "cpu"
    torch.testing.assert_close(loss, mmloss.contrastive_loss(q, k, backend="reference"))
    monkeypatch.setattr(backends, "_load_extension", lambda: (None, "not built (pip install .)"))
    with pytest.warns(UserWarning, match="dense reference"):
        mmloss.contrastive_loss(q, k, global_negatives=mode)
    assert mmloss.last_backend() == "reference"
