"""Constants of the contract (SPEC §1), shared by every backend. Imports nothing."""

IGNORE_INDEX = -100
"""A row whose positive is this value contributes nothing (as `F.cross_entropy(ignore_index=-100)`)."""

NORM_EPS = 1e-12
"""ε of `F.normalize`: `â = a / max(‖a‖, ε)`."""

MARGIN_SIN_EPS = 1e-12
"""ε in `sqrt(max(1 - c², ε))` of the closed-form angular margin."""

SYMMETRIC_MAX_INV_TEMP = 350.0
"""A symmetric loss runs both directions in one pass (backends with `forward_symmetric`) while
|1/τ| is at most this: the column sums share the shift 1/τ, and exp(logit - 1/τ) ≥ exp(-2/τ)
must stay within float64's range. Beyond it (τ < 0.0029) the two directions run separately."""
