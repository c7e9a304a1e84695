"""Argument checks for `contrastive_loss`: every bad input fails here, before any kernel runs.

Each error is a ValueError (bad value or shape) or TypeError (bad type or dtype) whose
message starts with the name of the offending argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from mmloss.constants import IGNORE_INDEX
from mmloss.problem import HARDNESS_ALL, HARDNESS_OTHERS, HARDNESS_OWN, LossProblem
from mmloss.reference import normalize

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
GLOBAL_NEGATIVES = ("gather", "ring")
PARTITIONS = ("joint", "per_block")
HARDNESS_NEGATIVES = {"all": HARDNESS_ALL, "others": HARDNESS_OTHERS, "own": HARDNESS_OWN}
"""The public `hardness_negatives` values and their LossProblem.hardness_scope codes."""

Temperature = Union[float, torch.Tensor]


def _capturing(device: torch.device) -> bool:
    """Value checks that need a device sync are skipped while a CUDA graph is captured."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _value_check(ok: torch.Tensor, device: torch.device, message) -> bool:
    """Whether the value check `ok` (a bool tensor) fails and must raise here. Reading it on
    the host would break a torch.compile graph, so while compiling it becomes an assertion in
    the graph (torch._assert_async: a RuntimeError with `message()` when it runs); it is
    skipped while a CUDA graph is captured (no sync allowed there)."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message())
        return False
    return not _capturing(device) and not bool(ok)


def check_embeddings(query, key, names: Tuple[str, str] = ("query", "key")) -> None:
    """Two 2-D float matrices of one dtype, device and width; errors use `names`."""
    for name, x in zip(names, (query, key)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, d), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} dtype {x.dtype} is not supported (float32, bfloat16, float16, float64)")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    first, second = names
    if query.dtype != key.dtype:
        raise TypeError(f"{second} dtype {key.dtype} differs from {first} dtype {query.dtype}")
    if query.device != key.device:
        raise ValueError(f"{second} is on {key.device} but {first} is on {query.device}")
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"{second} width {key.shape[1]} differs from {first} width {query.shape[1]}")


def _check_index_tensor(name: str, x, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must have dtype int64 or int32, got {x.dtype}")
    if x.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but query is on {device}")
    return x.to(torch.int64).contiguous()


def check_positives(positives, M: int, N: int, device: torch.device) -> torch.Tensor:
    if positives is None:
        if M > N:
            raise ValueError(f"positives=None means row i's positive is column i, which needs M <= N; got M={M}, N={N}")
        return torch.arange(M, device=device)
    positives = _check_index_tensor("positives", positives, M, device)
    bad = ((positives < 0) & (positives != IGNORE_INDEX)) | (positives >= N)
    rule = f"positives must be column indices in [0, {N}) or {IGNORE_INDEX} (ignore the row)"
    if _value_check(~bad.any(), device, lambda: rule):
        raise ValueError(f"{rule}; got {int(positives[bad][0])}")
    return positives


def check_temperature(temperature: Temperature, device: torch.device) -> None:
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"temperature must be a float or a 0-dim tensor, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but query is on {device}")
        t = temperature.detach().double()
        valid = t.isnan() | ((t > 0) & t.isfinite() & (1.0 / t).isfinite())  # NaN τ (a learnt τ gone bad): NaN out
        if _value_check(valid, device, lambda: "temperature must be finite and > 0"):
            _check_temperature_value(float(t))
        return
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    _check_temperature_value(float(temperature))


def _check_temperature_value(value: float) -> None:
    """τ must be finite and > 0 with a finite 1/τ (the kernels scale by 1/τ in float64).
    Comparisons only (NaN fails them): under torch.compile a float τ that changes between
    calls is a symbolic float, which comparisons guard on and math.isfinite cannot take."""
    if not (0.0 < value < math.inf and 1.0 / value < math.inf):
        raise ValueError(f"temperature must be finite and > 0 (with a finite 1/temperature), got {value}")


def check_margin(margin) -> float:
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a float (radians), got {type(margin).__name__}")
    if not 0.0 <= margin < math.pi / 2:
        raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}")
    return float(margin)


def _check_teacher_pair(name: str, pair, M: int, N: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(pair, Sequence) or len(pair) != 2:
        raise TypeError(f"{name} must be a pair (teacher rows (M, dt), teacher columns (N, dt))")
    rows, cols = pair
    for part, x, length in (("[0]", rows, M), ("[1]", cols, N)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}{part} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[0] != length or x.shape[1] == 0:
            raise ValueError(f"{name}{part} must have shape ({length}, dt) with dt >= 1, got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}{part} dtype {x.dtype} is not supported")
        if x.device != device:
            raise ValueError(f"{name}{part} is on {x.device} but query is on {device}")
    if rows.dtype != cols.dtype:
        raise TypeError(f"{name}: the two teacher tensors have different dtypes {rows.dtype} and {cols.dtype}")
    if rows.shape[1] != cols.shape[1]:
        raise ValueError(f"{name}: the two teacher tensors have different widths {rows.shape[1]} and {cols.shape[1]}")
    return rows, cols


def check_global_negatives(global_negatives, process_group) -> None:
    """`global_negatives` is None, "gather" or "ring"; a process group needs one of the two."""
    if global_negatives is None:
        if process_group is not None:
            raise ValueError("process_group was given without global_negatives ('gather' or 'ring')")
        return
    if not isinstance(global_negatives, str) or global_negatives not in GLOBAL_NEGATIVES:
        raise ValueError(f"global_negatives must be None or one of {GLOBAL_NEGATIVES}, got {global_negatives!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "global_negatives needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )


def _check_filter_threshold(threshold, M: int, device: torch.device):
    """A real number (not NaN), or an (M,) floating tensor of per-row thresholds (NaN entries
    are allowed: that row's loss is NaN, as a NaN teacher score makes it)."""
    if isinstance(threshold, torch.Tensor):
        if not threshold.is_floating_point():
            raise TypeError(f"filter_threshold tensor must be floating point, got {threshold.dtype}")
        if threshold.shape != (M,):
            raise ValueError(
                f"filter_threshold tensor must have shape ({M},) (one per row), got {tuple(threshold.shape)}"
            )
        if threshold.device != device:
            raise ValueError(f"filter_threshold is on {threshold.device} but query is on {device}")
        return threshold.detach()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"filter_threshold must be a float or an (M,) tensor, got {type(threshold).__name__}")
    if math.isnan(threshold):
        raise ValueError("filter_threshold must not be NaN")
    return float(threshold)


def lift_row_thresholds(fq: torch.Tensor, fk: torch.Tensor, threshold: torch.Tensor):
    """(fq' = [fq_i, -t_i] (M, df+1), fk' = [fk_j, 1] (N, df+1)): <fq'_i, fk'_j> = s_ij - t_i,
    so the kernels' scalar threshold 0 applies the per-row thresholds t (docs/contract.md §3).
    At least fp32 (a 16-bit t_i would round by 1e-3): exact up to the rounding of s_ij - t_i."""
    dtype = torch.promote_types(torch.promote_types(fq.dtype, fk.dtype), torch.float32)
    lifted_q = torch.cat([fq.to(dtype), -threshold.to(dtype)[:, None]], dim=1)
    lifted_k = torch.cat([fk.to(dtype), torch.ones(fk.shape[0], 1, dtype=dtype, device=fk.device)], dim=1)
    return lifted_q.contiguous(), lifted_k.contiguous()


def _check_hardness(strength, negatives, owners, M: int, N: int, device: torch.device):
    """(alpha, scope code, row_owners, key_owners) of the hardness penalty; alpha 0 = off."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"hardness_strength must be a float, got {type(strength).__name__}")
    if not 0.0 <= strength < math.inf:
        raise ValueError(f"hardness_strength must be finite and >= 0, got {strength}")
    if not isinstance(negatives, str) or negatives not in HARDNESS_NEGATIVES:
        raise ValueError(f"hardness_negatives must be one of {tuple(HARDNESS_NEGATIVES)}, got {negatives!r}")
    if negatives == "all":
        if owners is not None:
            raise ValueError("hardness_owners is only used with hardness_negatives='others' or 'own'")
        row_owners = key_owners = None
    else:
        if owners is None:
            raise ValueError(
                f"hardness_negatives={negatives!r} needs hardness_owners=(row_owners (M,), key_owners (N,))"
            )
        if not isinstance(owners, Sequence) or len(owners) != 2:
            raise TypeError("hardness_owners must be a pair (row_owners (M,), key_owners (N,)) of integer tensors")
        row_owners = _check_index_tensor("hardness_owners[0]", owners[0], M, device)
        key_owners = _check_index_tensor("hardness_owners[1]", owners[1], N, device)
    if strength == 0.0:
        return 0.0, HARDNESS_ALL, None, None
    return float(strength), HARDNESS_NEGATIVES[negatives], row_owners, key_owners


def positive_counts(row_groups: torch.Tensor, key_groups: torch.Tensor) -> torch.Tensor:
    """|P_i| (M,) int64: the number of columns j with key_groups[j] == row_groups[i]
    (O((M + N) log N), no M × N)."""
    values, counts = torch.unique(key_groups, return_counts=True)  # sorted
    at = torch.searchsorted(values, row_groups).clamp(max=values.numel() - 1)
    return torch.where(values[at] == row_groups, counts[at], torch.zeros_like(counts[at]))


def build_problem(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    positives: Optional[torch.Tensor],
    temperature: Temperature,
    margin: float,
    margin_teacher,
    filter_teacher,
    filter_threshold: Union[None, float, torch.Tensor],
    filter_normalize: bool,
    key_groups: Optional[torch.Tensor],
    symmetric: bool,
    reduction: str,
    backend: str,
    hardness_strength: float = 0.0,
    hardness_negatives: str = "all",
    hardness_owners=None,
    multi_positive: bool = False,
) -> LossProblem:
    """Checks every argument of `contrastive_loss` and returns what the kernels need.

    Teacher features are normalised here (they get no gradient): unit rows for the adaptive
    margin, and for the filter when `filter_normalize` is set; per-row filter thresholds are
    lifted into the filter features (`lift_row_thresholds`, threshold 0).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_embeddings(query, key)
    M, N = query.shape[0], key.shape[0]
    device = query.device
    check_temperature(temperature, device)
    margin = check_margin(margin)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if symmetric:
        if positives is not None:
            raise ValueError("positives must be None when symmetric=True (pair i is row i and column i)")
        if M != N:
            raise ValueError(f"symmetric=True needs as many keys as queries; got M={M}, N={N}")
    positives = check_positives(positives, M, N, device)
    valid_rows = positives != IGNORE_INDEX
    row_groups = None
    if key_groups is not None:
        key_groups = _check_index_tensor("key_groups", key_groups, N, device)
        row_groups = key_groups[positives.clamp(min=0)]
    if not isinstance(multi_positive, bool):
        raise TypeError(f"multi_positive must be a bool, got {type(multi_positive).__name__}")
    positive_weights = None
    if multi_positive:
        if key_groups is None:
            raise ValueError(
                "multi_positive=True needs key_groups (every column of the positive's group is a positive)"
            )
        positive_weights = 1.0 / positive_counts(row_groups, key_groups).double()
    hardness_strength, hardness_scope, row_owners, key_owners = _check_hardness(
        hardness_strength, hardness_negatives, hardness_owners, M, N, device
    )

    margin_query = margin_key = None
    if margin_teacher is not None:
        tq, tk = _check_teacher_pair("margin_teacher", margin_teacher, M, N, device)
        margin_query, margin_key = normalize(tq.detach()), normalize(tk.detach())

    if not isinstance(filter_normalize, bool):
        raise TypeError(f"filter_normalize must be a bool, got {type(filter_normalize).__name__}")
    filter_query = filter_key = None
    row_thresholds = isinstance(filter_threshold, torch.Tensor)
    if filter_teacher is not None:
        fq, fk = _check_teacher_pair("filter_teacher", filter_teacher, M, N, device)
        if filter_threshold is None:
            raise ValueError("filter_threshold is required with filter_teacher (its scale depends on the teacher)")
        filter_threshold = _check_filter_threshold(filter_threshold, M, device)
        fq, fk = fq.detach(), fk.detach()
        if filter_normalize:
            fq, fk = normalize(fq), normalize(fk)
        if row_thresholds:
            fq, fk = lift_row_thresholds(fq, fk, filter_threshold)
            filter_threshold = 0.0
        filter_query, filter_key = fq.contiguous(), fk.contiguous()
    elif filter_threshold is not None:
        raise ValueError("filter_threshold was given without filter_teacher")
    if symmetric:
        for name, on in (
            ("hardness_strength > 0", hardness_strength > 0),
            ("multi_positive=True", multi_positive),
            ("a per-row filter_threshold tensor", row_thresholds),
        ):
            if on:
                raise ValueError(f"symmetric=True does not take {name} (one direction only; call each direction)")

    return LossProblem(
        positives=positives,
        valid_rows=valid_rows,
        margin=margin,
        margin_query=margin_query,
        margin_key=margin_key,
        filter_query=filter_query,
        filter_key=filter_key,
        filter_threshold=float(filter_threshold) if filter_threshold is not None else 0.0,
        key_groups=key_groups,
        row_groups=row_groups,
        hardness_strength=hardness_strength,
        hardness_scope=hardness_scope,
        row_owners=row_owners,
        key_owners=key_owners,
        positive_weights=positive_weights,
    )
