"""The validated arguments of one direction of the core op, as every kernel backend gets them.

`mmloss.checks.build_problem` makes a `LossProblem` from the public call's arguments; the
kernel backends (cpu, triton, cuda) read it and never see the raw keyword arguments. The
fields a kernel reads (`KERNEL_FIELDS`) cross into C++ as one struct, declared once in
csrc/include/mmloss/problem.h in the same order; `kernel_args` is the one place that turns a
problem into op arguments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

KERNEL_FIELDS: Tuple[str, ...] = (
    "positives",
    "margin",
    "margin_query",
    "margin_key",
    "filter_query",
    "filter_key",
    "filter_threshold",
    "row_groups",
    "key_groups",
    "hardness_strength",
    "hardness_scope",
    "row_owners",
    "key_owners",
    "positive_weights",
)
"""The fields every mmloss:: op takes after (query, key, inv_temp), in this order (the field list
of csrc/include/mmloss/problem.h)."""


HARDNESS_ALL, HARDNESS_OTHERS, HARDNESS_OWN = 0, 1, 2
"""The values of LossProblem.hardness_scope (the kernels' integer codes)."""


class UnsupportedFeature(ValueError):
    """A kernel backend does not compute a feature of docs/contract.md §3 (yet): raised by
    `LossProblem.reject_features` before any kernel runs (the test suites skip such pairs)."""


@dataclasses.dataclass(frozen=True)
class LossProblem:
    """One direction of `contrastive_loss`: rows `query` (M, d) against columns `key` (N, d).

    The columns may be one block of a larger key set (global negatives): a kernel computes the
    log-sum-exp over its columns only, and the caller combines blocks.

    positives:        (M,) int64, the positive's column in this block; any value outside
                      [0, N) means the row's positive is not in this block (or it is ignored).
    valid_rows:       (M,) bool, False for ignored rows (their loss is 0, their weight 0).
    margin:           angular margin m in radians, 0 = plain InfoNCE.
    margin_query, margin_key:
                      (M, dt), (N, dt) unit-norm teacher rows for the adaptive margin
                      m'_ij = m (1 - <margin_query_i, margin_key_j>), or None (m' = m).
    filter_query, filter_key:
                      (M, df), (N, df) teacher rows whose dot product s_ij drops negative j
                      from row i when s_ij > filter_threshold (already unit-norm when the caller
                      asked for the cosine), or None.
    key_groups:       (N,) int64 group id per column, or None.
    row_groups:       (M,) int64 group id of each row's positive (set with key_groups).
    hardness_strength:
                      alpha >= 0 of the hardness penalty: logit_ij = f(c_ij)/τ + alpha·c_ij on
                      the penalised negatives, the alpha·c_ij term carrying no gradient; 0 = off.
    hardness_scope:   which negatives are penalised: HARDNESS_ALL, HARDNESS_OTHERS (columns of
                      other rows: key_owners[j] != row_owners[i]) or HARDNESS_OWN (the row's
                      own columns, its hard negatives: key_owners[j] == row_owners[i]).
    row_owners, key_owners:
                      (M,), (N,) int64 owner ids for the hardness scope (-1: a column of no
                      row), or None (HARDNESS_ALL).
    positive_weights: (M,) float64 1/|P_i| when every column of the positive's group
                      (key_groups[j] == row_groups[i]) is a positive (several positives per
                      row; the group mask then removes nothing), or None (the one positive
                      `positives[i]`). pos_logit is then Σ_{j∈P_i} positive_weights_i·logit_ij.
    """

    positives: torch.Tensor
    valid_rows: torch.Tensor
    margin: float = 0.0
    margin_query: Optional[torch.Tensor] = None
    margin_key: Optional[torch.Tensor] = None
    filter_query: Optional[torch.Tensor] = None
    filter_key: Optional[torch.Tensor] = None
    filter_threshold: float = 0.0
    key_groups: Optional[torch.Tensor] = None
    row_groups: Optional[torch.Tensor] = None
    hardness_strength: float = 0.0
    hardness_scope: int = 0
    row_owners: Optional[torch.Tensor] = None
    key_owners: Optional[torch.Tensor] = None
    positive_weights: Optional[torch.Tensor] = None

    @property
    def adaptive_margin(self) -> bool:
        return self.margin_query is not None

    @property
    def has_filter(self) -> bool:
        return self.filter_query is not None

    @property
    def has_hardness(self) -> bool:
        return self.hardness_strength > 0.0

    @property
    def multi_positive(self) -> bool:
        return self.positive_weights is not None

    def reject_features(self, backend: str, features=("hardness", "multi_positive")) -> None:
        """UnsupportedFeature (a ValueError) naming the public argument when this problem uses
        one of `features` that `backend` does not compute (a backend's `check` calls this
        before any kernel runs)."""
        used = {
            "hardness": (self.has_hardness, "the hardness penalty (hardness_strength > 0)"),
            "multi_positive": (self.multi_positive, "several positives per row (multi_positive=True)"),
        }
        for name in features:
            on, what = used[name]
            if on:
                raise UnsupportedFeature(f"backend {backend!r} does not compute {what}; use backend='reference'")

    @property
    def cos_threshold(self) -> float:
        """cos m: negatives with c_ij >= cos m keep f = c (docs/contract.md §1: near-duplicates untouched).
        Not the cosine of the applied margin m' (cos m' and sin m' are the kernels' to form)."""
        return math.cos(self.margin)

    def kernel_args(self) -> tuple:
        """The KERNEL_FIELDS values in order, as the mmloss:: ops take them (Float fields as
        float, Int fields as int)."""
        return tuple(_FIELD_CASTS.get(name, _keep)(getattr(self, name)) for name in KERNEL_FIELDS)

    def transposed(self) -> "LossProblem":
        """The column direction of a symmetric loss: keys become rows (diagonal positives)."""
        return dataclasses.replace(
            self,
            margin_query=self.margin_key,
            margin_key=self.margin_query,
            filter_query=self.filter_key,
            filter_key=self.filter_query,
            key_groups=self.row_groups,
            row_groups=self.key_groups,
            row_owners=self.key_owners,
            key_owners=self.row_owners,
        )


def _keep(value):
    return value


_FIELD_CASTS = {"margin": float, "filter_threshold": float, "hardness_strength": float, "hardness_scope": int}
"""The scalar KERNEL_FIELDS and the Python type each crosses the op boundary as."""
