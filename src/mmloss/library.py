"""The torch.library ops of mmloss._C and their fake implementations (torch.compile, meta).

    torch.ops.mmloss.contrastive_forward(query, key, inv_temp, positives, margin,
        margin_query, margin_key, filter_query, filter_key, filter_threshold,
        row_groups, key_groups, chunk_rows) -> (lse (M,), pos_logit (M,))
    torch.ops.mmloss.contrastive_backward(<the same>, lse, row_weight, need_temp_grad,
        chunk_rows) -> (d_query (M, d), d_key (N, d), d_inv_temp 0-dim float64)

One key block of the kernel contract (mmloss.backends); the schemas are defined in
csrc/ops.cpp. CPU tensors run the OpenMP kernel (lse and pos_logit in float64), CUDA tensors the CUDA
kernels (lse in float64, pos_logit in float32; only in a CUDA build). `inv_temp` is a 1-element tensor. `chunk_rows` is the
CPU's strip height and the CUDA backward's scratch chunk (the CUDA forward ignores it).
Importing this module loads mmloss._C (which registers the ops) and registers the fakes.
"""

from __future__ import annotations

import torch

from mmloss import _C  # noqa: F401  (registers the mmloss:: ops)


def _pos_logit_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.device.type == "cpu" else torch.float32


@torch.library.register_fake("mmloss::contrastive_forward")
def _forward_fake(query, key, inv_temp, positives, margin, margin_query, margin_key, filter_query, filter_key,
                  filter_threshold, row_groups, key_groups, chunk_rows):
    rows = query.shape[0]
    return query.new_empty(rows, dtype=torch.float64), query.new_empty(rows, dtype=_pos_logit_dtype(query))


@torch.library.register_fake("mmloss::contrastive_backward")
def _backward_fake(query, key, inv_temp, positives, margin, margin_query, margin_key, filter_query, filter_key,
                   filter_threshold, row_groups, key_groups, lse, row_weight, need_temp_grad, chunk_rows):
    return (query.new_empty(query.shape[0], query.shape[1]), key.new_empty(key.shape[0], key.shape[1]),
            query.new_empty((), dtype=torch.float64))
