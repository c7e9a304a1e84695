"""Fixtures of the whole suite."""

import pytest
import torch

from mmloss.backends import unavailable_reason
from mmloss.problem import UnsupportedFeature

_KERNEL_BACKENDS = [
    pytest.param((name, device), id=f"{name}-{device}")
    for name, device in (("cpu", "cpu"), ("triton", "cuda"), ("cuda", "cuda"))
    if (device == "cpu" or torch.cuda.is_available()) and unavailable_reason(name, torch.device(device)) is None
]


@pytest.fixture(params=_KERNEL_BACKENDS)
def kernel_backend(request):
    """(backend name, device) of each kernel backend that can run here."""
    return request.param


@pytest.fixture
def backend(kernel_backend):
    return kernel_backend[0]


@pytest.fixture
def device(kernel_backend):
    return kernel_backend[1]


def _rejection(exc):
    """The UnsupportedFeature behind `exc` (torch.compile re-raises it as a dynamo error whose
    cause is an ObservedUnsupportedFeatureError), or None."""
    while exc is not None:
        if isinstance(exc, UnsupportedFeature) or type(exc).__name__ == "ObservedUnsupportedFeatureError":
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A kernel backend that rejects a docs/contract.md §3 feature by name (UnsupportedFeature,
    before any kernel runs) skips that test, as pytest.skip would: the (backend, feature) pair
    is not claimed. The helper who implements it deletes the rejection and the test runs."""
    outcome = yield
    report = outcome.get_result()
    rejection = _rejection(call.excinfo.value) if report.when == "call" and call.excinfo is not None else None
    if rejection is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {rejection}")
