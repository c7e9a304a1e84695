"""The torch.library ops of mmloss._C and their fake implementations (torch.compile, meta).

Every op takes (query (M, d), key (N, d), inv_temp (1,), *the problem's fields
(mmloss.problem.KERNEL_FIELDS, in that order), *its own inputs, chunk_rows, chunk_cols) and
returns a fixed tuple:

    contrastive_forward            -> (lse (M,), pos_logit (M,))
    contrastive_forward_with_grad  (row_weight)
                                   -> (lse, pos_logit, d_query (M, d), d_key (N, d), d_inv_temp ())
    contrastive_backward           (lse, row_weight, need_temp_grad)
                                   -> (d_query, d_key, d_inv_temp)
    contrastive_forward_symmetric  -> (lse (M,), lse_col (N,), pos_logit (M,))
    contrastive_backward_symmetric (lse, lse_col, row_weight, col_weight, need_temp_grad)
                                   -> (d_query, d_key, d_inv_temp)

One key block of the kernel contract (mmloss.backends); the schemas are generated in
csrc/ops.cpp from csrc/include/mmloss/problem.h. CPU tensors run the OpenMP kernels (lse and
pos_logit in float64, all five ops), CUDA tensors the CUDA kernels (lse in float64, pos_logit
in float32; forward and backward, only in a CUDA build). `inv_temp` is a 1-element tensor.
`chunk_rows` is the CPU's strip height and the CUDA backward's scratch chunk (the CUDA forward
ignores it); `chunk_cols` the columns of a CPU strip's tiles (0 = all N; the CUDA kernels
ignore it). d_inv_temp is float64 (0 when need_temp_grad is false). Importing this module loads
mmloss._C (which registers the ops) and registers the fakes.
"""

from __future__ import annotations

import torch

from mmloss import _C  # noqa: F401  (registers the mmloss:: ops)

OPS = (
    "contrastive_forward",
    "contrastive_forward_with_grad",
    "contrastive_backward",
    "contrastive_forward_symmetric",
    "contrastive_backward_symmetric",
)


def _lse(x: torch.Tensor) -> torch.Tensor:
    """(rows,) log-sum-exp of `x`'s rows: float64 on every device."""
    return x.new_empty(x.shape[0], dtype=torch.float64)


def _pos_logit(x: torch.Tensor) -> torch.Tensor:
    """(rows,) positive logit of `x`'s rows: float64 on the CPU, float32 on CUDA."""
    return x.new_empty(x.shape[0], dtype=torch.float64 if x.device.type == "cpu" else torch.float32)


def _grads(query: torch.Tensor, key: torch.Tensor):
    return query.new_empty(query.shape), key.new_empty(key.shape), query.new_empty((), dtype=torch.float64)


@torch.library.register_fake("mmloss::contrastive_forward")
def _forward_fake(query, key, inv_temp, *rest):
    return _lse(query), _pos_logit(query)


@torch.library.register_fake("mmloss::contrastive_forward_with_grad")
def _forward_with_grad_fake(query, key, inv_temp, *rest):
    return (_lse(query), _pos_logit(query), *_grads(query, key))


@torch.library.register_fake("mmloss::contrastive_backward")
def _backward_fake(query, key, inv_temp, *rest):
    return _grads(query, key)


@torch.library.register_fake("mmloss::contrastive_forward_symmetric")
def _forward_symmetric_fake(query, key, inv_temp, *rest):
    return _lse(query), _lse(key), _pos_logit(query)


@torch.library.register_fake("mmloss::contrastive_backward_symmetric")
def _backward_symmetric_fake(query, key, inv_temp, *rest):
    return _grads(query, key)
