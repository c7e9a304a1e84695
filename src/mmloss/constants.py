"""Constants of the contract (docs/contract.md §1), shared by every backend. Imports nothing."""

IGNORE_INDEX = -100
"""A row whose positive is this value contributes nothing (as `F.cross_entropy(ignore_index=-100)`)."""

NORM_EPS = 1e-12
"""ε of `F.normalize`: `â = a / max(‖a‖, ε)`."""

MARGIN_SIN_EPS = 1e-12
"""ε in `sqrt(max(1 - c², ε))` of the closed-form angular margin."""
