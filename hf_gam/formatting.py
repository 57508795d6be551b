"""How hf_gam writes numbers and settings into model cards and reports (one rule for both)."""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["format_value"]


def format_value(value: Any) -> Any:
    """Floats to 4 significant digits (``nan``/``inf`` as such), enums to their value, anything else unchanged."""
    if isinstance(value, enum.Enum):  # OptimizerNames, SchedulerType, ...
        return value.value
    if isinstance(value, float):
        return f"{value:.4g}"
    return value
