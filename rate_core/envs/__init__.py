"""Environments of the memory tasks."""

import numbers


def action_index(action, count: int, what: str, names: str) -> int:
    """`action` as an int in [0, count), or ValueError naming the env (what) and its actions (names).
    A whole number only: 1.7 is not taken for action 1."""
    if getattr(action, "shape", None) == ():  # a 0-d array
        action = action.item()
    if not isinstance(action, numbers.Integral) or isinstance(action, bool) or not 0 <= action < count:
        raise ValueError(f"invalid {what} action {action!r}: expected {names}")
    return int(action)


def probability(name: str, value) -> float:
    """`value` as a float in [0, 1], or ValueError naming the setting (an expert's noise, a detour rate)."""
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(f"{name} is a probability from 0 to 1, got {value}")
    return float(value)
