"""One forward+backward step of each method the GPU benchmark measures, on fixed inputs.

    step = build_step(torch, mmloss, method, features, dtype, n, d, device, teacher_width, graph)
    step.run()      # one fwd+bwd (gradients of query and key), asynchronous on CUDA

Methods: mmloss_triton, mmloss_cuda (contrastive_loss with that backend and a feature set:
plain, margin, adaptive, filter, groups, symmetric), eager (bench.anchors.eager_loss, dense),
compiled (torch.compile of eager, dynamic shapes: one compile serves every N), cce
(cut-cross-entropy's fused kernels with its default gradient filtering), cce_exact (the same
without filtering), infcl (Inf-CL's ring kernel), floor (the 3 GEMMs of
N × N × d that any exact method does: S = QKᵀ, dQ = S K, dK = Sᵀ Q, in ≤ 1 GiB row chunks).
graph=True captures the step into a CUDA graph (run = one replay). On the CPU (the dry
run) compiled uses torch.compile's "eager" backend and cce its torch_compile path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List

from bench import anchors

TEMPERATURE = 0.05
FEATURES = ("plain", "margin", "adaptive", "filter", "groups", "symmetric")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass
class Step:
    run: Callable[[], None]
    keep: List[object] = dataclasses.field(default_factory=list)  # inputs, a graph and its outputs
    clear: Callable[[], None] = lambda: None  # frees the last step's gradients (before a memory reading)


def make_inputs(torch, n: int, d: int, dtype, device, seed: int = 0):
    """Query and key (n, d), generated on the device, requiring grad: standard normal keys and
    queries = key + standard normal noise (cos ≈ 0.7 with the positive, ≈ 0 with the rest),
    so that losses, errors and cut-cross-entropy's gradient filtering see a peaked softmax."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    q = k + torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    return q.to(dtype).requires_grad_(True), k.to(dtype).requires_grad_(True)


def feature_kwargs(torch, features: str, n: int, dt: int, dtype, device) -> Dict[str, object]:
    """contrastive_loss arguments of a feature set; teachers of width dt in the inputs' dtype."""
    g = torch.Generator(device=device).manual_seed(1)

    def teacher():
        return (
            torch.randn(n, dt, generator=g, device=device).to(dtype),
            torch.randn(n, dt, generator=g, device=device).to(dtype),
        )

    if features == "plain":
        return {}
    if features == "margin":
        return {"margin": 0.15}
    if features == "adaptive":
        return {"margin": 0.15, "margin_teacher": teacher()}
    if features == "filter":  # raw teacher dots ~ N(0, dt): 3 sigma drops ~0.1 % of the pairs
        return {"filter_teacher": teacher(), "filter_threshold": 3.0 * math.sqrt(dt)}
    if features == "groups":
        return {"key_groups": torch.arange(n, device=device) // 5}
    if features == "symmetric":
        return {"symmetric": True}
    raise ValueError(f"features must be one of {FEATURES}; got {features!r}")


def loss_fn(torch, mmloss, method: str, features: str, n: int, dt: int, dtype, device):
    """(query, key) -> scalar loss of `method`."""
    if method in ("mmloss_triton", "mmloss_cuda"):
        backend = method.split("_", 1)[1]
        kw = feature_kwargs(torch, features, n, dt, dtype, device)
        return lambda q, k: mmloss.contrastive_loss(q, k, temperature=TEMPERATURE, backend=backend, **kw)
    if features != "plain":
        raise ValueError(f"{method} has only the plain loss; got features={features!r}")
    if method == "eager":
        return lambda q, k: anchors.eager_loss(q, k, TEMPERATURE)
    if method == "compiled":
        backend = "inductor" if device.type == "cuda" else "eager"
        return torch.compile(lambda q, k: anchors.eager_loss(q, k, TEMPERATURE), dynamic=True, backend=backend)
    if method in ("cce", "cce_exact"):
        impl = "cce" if device.type == "cuda" else "torch_compile"
        eps = "high" if method == "cce" else None
        return lambda q, k: anchors.cce_loss(q, k, TEMPERATURE, impl=impl, filter_eps=eps)
    if method == "infcl":
        if device.type != "cuda":
            raise ImportError("Inf-CL needs CUDA and NCCL")
        return lambda q, k: anchors.infcl_loss(q, k, TEMPERATURE)
    raise ValueError(f"unknown method {method!r}")


def floor_step(torch, q, k) -> Step:
    """The 3 GEMMs of N × N × d in the inputs' dtype, in row chunks of ≤ 1 GiB of S."""
    n = q.shape[0]
    rows = max(1, min(n, (1 << 30) // (q.element_size() * n)))
    qd, kd = q.detach(), k.detach()
    dk = torch.zeros_like(kd)

    def run():
        for r0 in range(0, n, rows):
            s = qd[r0 : r0 + rows] @ kd.T
            s @ kd
            dk.addmm_(s.T, qd[r0 : r0 + rows])

    return Step(run, [dk])


def graphed(torch, fn, q, k) -> Step:
    """fwd+bwd of fn captured into a CUDA graph after three warm-up calls on a side stream
    (compiles and autotunes outside the capture); run = one replay."""

    def grads():
        return torch.autograd.grad(fn(q, k), (q, k))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            grads()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grads()
    return Step(graph.replay, [graph, out])


INTEGRATION_METHODS = {"integration_peer": "peer", "integration_mmloss": "mmloss"}
"""GPU rows of the drop-in losses: method -> integrations_bench's impl."""


def integration_step(torch, impl: str, case: str, batch: int, width: int, device, seed: int = 0) -> Step:
    """One forward+backward of integrations_bench's `case` by `impl` (fp32 embeddings)."""
    from bench import integrations_bench

    torch.manual_seed(seed)
    inputs, step = integrations_bench.build(case, impl, batch, width, device)

    def clear():
        for x in inputs:
            x.grad = None

    def run():
        clear()
        step()

    return Step(run, inputs, clear)


def build_step(
    torch,
    mmloss,
    method: str,
    features: str,
    dtype,
    n: int,
    d: int,
    device,
    teacher_width: int = 256,
    graph: bool = False,
    seed: int = 0,
) -> Step:
    """Inputs of (n, d) and the step of `method`; raises ImportError where a package is missing.
    The methods in INTEGRATION_METHODS run bench/integrations_bench.py's row `features` (a case
    there: a sentence-transformers or OpenCLIP loss, the peer's or mmloss's drop-in) at B = n."""
    if method in INTEGRATION_METHODS:
        return integration_step(torch, INTEGRATION_METHODS[method], features, n, d, device, seed)
    q, k = make_inputs(torch, n, d, dtype, device, seed)
    if method == "floor":
        return floor_step(torch, q, k)
    fn = loss_fn(torch, mmloss, method, features, n, teacher_width, dtype, device)
    if graph:
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a GPU")
        return graphed(torch, fn, q, k)

    def clear():
        q.grad = k.grad = None

    def run():
        clear()
        fn(q, k).backward()

    return Step(run, [q, k], clear)
