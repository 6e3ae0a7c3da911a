"""Typed errors: each names what is wrong and how to fix it."""

from __future__ import annotations


class QdqError(Exception):
    """Base of every error qdq raises on bad input."""


class SchemeError(QdqError, ValueError):
    """A quantization scheme with invalid or contradictory fields."""


class RangeError(QdqError, ValueError):
    """A calibration range that is not finite or has lo > hi."""


class DataError(QdqError, ValueError):
    """Input data with the wrong dtype, shape or non-finite values."""


class ObserverStateError(QdqError, RuntimeError):
    """An observer used out of order (a range asked for before any data, mismatched merge)."""


class ModelError(QdqError, ValueError):
    """A model file that is missing, unreadable, unsafe or uses what qdq cannot handle."""
