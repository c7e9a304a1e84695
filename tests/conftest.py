"""Fixtures of the whole suite."""

import pytest
import torch

from mmloss.backends import unavailable_reason

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
