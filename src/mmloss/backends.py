"""Which backends exist, which one runs, and what was compiled.

A kernel backend is a module with

    check(query, problem) -> None        raise TypeError/ValueError for what it cannot serve
    forward(query, key, inv_temp, problem) -> (lse (M,), pos_logit (M,))
        lse_i = log-sum-exp over the allowed columns of this key block of logit_ij;
        pos_logit_i = logit of the row's positive when it is in this block, else 0.
    backward(query, key, inv_temp, problem, lse, row_weight, need_temp_grad)
        -> (d_query (M, d), d_key (N, d), d_inv_temp 0-dim tensor or None)
        the gradient of sum_i row_weight_i * loss_i over this block's columns, where
        P_ij = exp(logit_ij - lse_i) uses the given (possibly global) lse.

A backend may also serve a symmetric loss (M == N, diagonal positives) in one pass:

    forward_symmetric(query, key, inv_temp, problem) -> (lse (M,), lse_col (N,), pos_logit (M,))
    backward_symmetric(query, key, inv_temp, problem, lse, lse_col, row_weight, col_weight,
                       need_temp_grad) -> (d_query, d_key, d_inv_temp or None)
        lse_col_j = log-sum-exp over i of the same logits (the column direction); the
        gradient of sum_i w_i row_loss_i + sum_j v_j col_loss_j.

A backend may also form the gradient of Σ_{valid i} loss_i during the forward pass:

    forward_with_grad(query, key, inv_temp, problem)
        -> (lse, pos_logit, d_query, d_key, d_inv_temp 0-dim)

`contrastive_loss` uses the pair when the module has it, else one forward/backward per
direction.
`query`/`key` are the raw (unnormalised) embeddings (normalisation is the kernel's job),
`inv_temp` is 1/τ as a float or a 0-dim tensor, `problem` a `mmloss.problem.LossProblem`.
lse and pos_logit are fp32 or wider (fp64 for fp64 inputs); gradients have the inputs' dtypes;
d_inv_temp is float64. The
block form lets `mmloss.distributed` combine key blocks held by different ranks.
Nothing here falls back silently: `auto` picks per device, warns once per reason when it
has to run the dense reference (no compiled extension, Triton missing, float64 on CUDA), and
every call records the backend that ran in a context variable (`last_backend()`: per thread
and per asyncio task); a named backend that is not available raises.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import json
import logging
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

from mmloss.kernel_common import triton_interpreted

log = logging.getLogger("mmloss")

_KERNEL_MODULES = {"cpu": "mmloss.cpu", "triton": "mmloss.triton", "cuda": "mmloss.cuda"}
_loaded: Dict[str, ModuleType] = {}
_backend_ran: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mmloss_backend_ran", default=None)
_warned = set()  # the fallback reasons `auto` has warned about (once each)
_warned_lock = threading.Lock()
AUTO_TABLE = Path(__file__).with_name("auto_table.json")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _load_extension() -> Tuple[Optional[ModuleType], Optional[str]]:
    """(mmloss._C, None), or (None, why not): see mmloss.extension."""
    from mmloss import extension

    return extension.load()


def compiled_extension() -> Optional[ModuleType]:
    """mmloss._C, or None when it is not built or does not load (`extension_error()` says why)."""
    return _load_extension()[0]


def extension_error() -> Optional[str]:
    return _load_extension()[1]


def _triton_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    return None


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend `name` can run on `device`, else a sentence saying why not."""
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        if compiled_extension() is None:
            return f"backend 'cpu' needs the compiled extension mmloss._C, which is {extension_error()}"
        return None
    if name in ("triton", "cuda"):
        interpreted = name == "triton" and triton_interpreted()
        if device.type != "cuda" and not interpreted:
            return f"backend '{name}' runs on CUDA tensors, got tensors on {device}"
        if name == "triton":
            return _triton_error()
        ext = compiled_extension()
        if ext is None or not ext.has_cuda():
            return "backend 'cuda' needs mmloss._C built with CUDA (a CUDA torch and a CUDA toolkit)"
        return None
    raise ValueError(f"backend must be one of auto, reference, cpu, triton, cuda; got {name!r}")


@functools.lru_cache(maxsize=None)
def auto_table(path: Path = AUTO_TABLE) -> Dict[str, object]:
    """The committed table `auto` reads on CUDA (src/mmloss/auto_table.json, written by bench/gpu.sh).

    {"gpu_run": null or {"device", "date", "cuda_tests": "passed" | ..., ...},
     "cuda_faster": [{"dtype": "bf16" | "fp16" | "fp32", "min_n": int, "max_n": int}, ...]}:
    the (dtype, N range) pairs where the CUDA backend beat Triton in that run."""
    return json.loads(Path(path).read_text())


def cuda_proven(table: Dict[str, object]) -> bool:
    """Whether the table's GPU run passed the CUDA correctness suite (else auto never picks cuda)."""
    run = table.get("gpu_run")
    return isinstance(run, dict) and run.get("cuda_tests") == "passed"


def auto_cuda_choice(dtype: torch.dtype, size: Optional[int], table: Dict[str, object]) -> str:
    """ "cuda" where the table's proven run measured it faster for this dtype and size, else "triton"."""
    if not cuda_proven(table) or size is None:
        return "triton"
    name = _DTYPE_NAMES.get(dtype)
    for row in table.get("cuda_faster", []):
        if row["dtype"] == name and row["min_n"] <= size <= row["max_n"]:
            return "cuda"
    return "triton"


def _auto(device: torch.device, dtype: torch.dtype, size: Optional[int]) -> Tuple[str, Optional[str]]:
    """(the backend `auto` takes, why it is the dense reference or None)."""
    if device.type == "cpu":
        if compiled_extension() is None:
            return "reference", f"the compiled extension mmloss._C is {extension_error()}"
        return "cpu", None
    if device.type != "cuda":
        return "reference", f"no kernel backend serves {device.type} tensors"
    if dtype == torch.float64:
        return "reference", "float64 is not served by the Triton or CUDA kernels (float32, bfloat16, float16)"
    triton_missing = _triton_error()
    if triton_missing is not None:
        return "reference", triton_missing
    choice = auto_cuda_choice(dtype, size, auto_table())
    if choice == "cuda" and unavailable_reason("cuda", device) is not None:
        choice = "triton"  # this build has no CUDA kernels: the table's other choice
    return choice, None


def _warn_once(reason: str, device: torch.device, dtype: torch.dtype) -> None:
    with _warned_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(
        f"mmloss: backend='auto' runs the dense reference (it builds the M x N logits) for "
        f"{device.type} {dtype} tensors: {reason}. Pass backend='reference' to choose it "
        "explicitly, or a kernel backend to make this an error.",
        stacklevel=5,
    )


def resolve(backend: str, device: torch.device, dtype: torch.dtype, size: Optional[int] = None) -> str:
    """The backend that will run: `backend` itself if it can, else an error; `auto` chooses.

    On CPU, `auto` takes cpu (the reference, with a warning, without mmloss._C). On CUDA it
    takes triton, or cuda where the committed table (`auto_table`) shows it faster for
    (dtype, size = the number of keys) in a GPU run that passed the CUDA suite; the reference,
    with a warning once per reason, where neither can serve the call (Triton missing, float64)."""
    if backend == "auto":
        backend, fallback = _auto(device, dtype, size)
        if fallback is not None:
            _warn_once(fallback, device, dtype)
        log.debug("mmloss: backend='auto' chose %r for %s %s", backend, device, dtype)
        return backend
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(reason)
    return backend


def _constant_result(fn):
    """The mark of torch.compiler.assume_constant_result (torch.compile runs `fn` when it
    traces and keeps its result as a constant), set without importing torch._dynamo, which
    would double the import time of mmloss."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def choose(backend: str, device: torch.device, dtype: torch.dtype, size: Optional[int] = None) -> str:
    """`resolve`, then load the chosen kernel module and record the choice (`last_backend`).
    Under torch.compile this runs when the graph is traced: the choice is a constant of the
    graph, recorded then (a compiled graph cannot set a context variable at each run; dynamo
    drops such side effects of inlined library code)."""
    name = resolve(backend, device, dtype, size)
    if name in _KERNEL_MODULES and name not in _loaded:
        _loaded[name] = importlib.import_module(_KERNEL_MODULES[name])
    record(name)
    return name


def kernels(name: str) -> ModuleType:
    """The kernel module of a non-reference backend (loaded by `choose`)."""
    module = _loaded.get(name)
    return module if module is not None else importlib.import_module(_KERNEL_MODULES[name])


def record(name: str) -> None:
    """Record that backend `name` serves the current call (in this thread / task's context)."""
    _backend_ran.set(name)


def last_backend() -> Optional[str]:
    """The backend that served the most recent `contrastive_loss` call in this thread (or
    asyncio task); None before the first. A torch.compile'd call records when it is traced."""
    return _backend_ran.get()


def build_info() -> Dict[str, object]:
    """What this installation can run: printed by `python -m mmloss.info`."""
    from mmloss._version import __version__

    ext = compiled_extension()
    info: Dict[str, object] = {
        "mmloss": __version__,
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "mmloss._C": extension_error() if ext is None else "built",
    }
    if ext is not None:
        threads, isa, gemm16 = ext.openmp_threads() or "off", ext.cpu_isa(), ext.cpu_gemm16()
        info["compiled CPU kernels"] = f"yes (OpenMP: {threads}; ISA: {isa}; bf16 GEMMs: {gemm16})"
        info["compiled CUDA kernels"] = ", ".join(f"sm_{a}" for a in ext.cuda_archs()) if ext.has_cuda() else "no"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    info["backends here"] = ", ".join(
        n
        for n in ("reference", "cpu", "triton", "cuda")
        if unavailable_reason(n, torch.device("cpu")) is None
        or (torch.cuda.is_available() and unavailable_reason(n, torch.device("cuda")) is None)
    )
    return info
