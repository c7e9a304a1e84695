import pytest
import torch

from mmloss.backends import unavailable_reason

# Kernel backends that can run here, with the device their tests use.
KERNEL_BACKENDS = [
    pytest.param(name, device, id=f"{name}-{device}")
    for name, device in (("cpu", "cpu"), ("triton", "cuda"), ("cuda", "cuda"))
    if (device == "cpu" or torch.cuda.is_available()) and unavailable_reason(name, torch.device(device)) is None
]
