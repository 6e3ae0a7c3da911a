"""Typed errors: each names what is wrong and how to fix it."""

from __future__ import annotations

import enum
import numbers
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)
_KIND_NAMES = {numbers.Integral: "an integer", numbers.Real: "a number", type(None): "None"}


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


class UsageError(QdqError, ValueError):
    """A command-line flag with a meaningless value or a combination that cannot work."""


class OutputError(QdqError, ValueError):
    """An output path that would overwrite an input, is not a file, or cannot be written."""


class ArgumentError(QdqError, TypeError):
    """An argument of the wrong type given to qdq's Python API."""


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) turned into an exception, so that `finally` blocks
    and context managers remove temporary files on the way out. A BaseException, like
    KeyboardInterrupt, so that `except Exception` does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def choice(kind: type[E], value: object, what: str) -> E:
    """`value` as a member of the enum `kind`, or a SchemeError naming `what` and the choices.

    >>> import enum
    >>> choice(enum.Enum("Color", {"RED": "red"}), "red", "color").value
    'red'
    """
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(str(m.value) for m in kind)
        raise SchemeError(f"unknown {what} {value!r}; choose one of {names}") from None


def expect(value: object, kind: type | tuple[type, ...], what: str, hint: str = "") -> None:
    """Raise ArgumentError unless `value` is a `kind`, naming `what` it should be and, where
    given, how to build one; a bool is no int here.

    >>> expect(3, numbers.Integral, "bits")
    >>> expect(True, numbers.Integral, "bits")
    Traceback (most recent call last):
    qdq.errors.ArgumentError: bits must be an integer, got True (bool)
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return
    names = " or ".join(dict.fromkeys(_KIND_NAMES.get(k, k.__name__) for k in kinds))
    raise ArgumentError(
        f"{what} must be {names}, got {value!r:.80} ({type(value).__name__}){hint and '; '}{hint}"
    )


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of `error`'s message (its type's name if it has none), for one-line
    reports of what another library raised.

    >>> first_line(RuntimeError("graph.cc: bad node\\nstack..."))
    'graph.cc: bad node'
    """
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
