"""Errors raised by the core. Each names the quantity and the value at fault."""

from __future__ import annotations


class PdControllerError(Exception):
    """Base of every error this project raises on purpose."""


class ModelInputError(PdControllerError, ValueError):
    """A model was asked something outside its domain (bad length, rate, objective)."""

    def __init__(self, quantity: str, value: object, why: str) -> None:
        self.quantity = quantity
        self.value = value
        self.why = why
        super().__init__(f"{quantity}={value!r}: {why}")


class ProfileError(PdControllerError, ValueError):
    """A hardware/model profile is empty, malformed or not monotone."""


class InfeasibleError(PdControllerError, ValueError):
    """No configuration meets the objectives (e.g. TPOT target below the fastest step)."""
