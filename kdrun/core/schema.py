"""Types with ranges for config values, and the one checker.

Each user-facing value is declared once, where it is defined: in the signature of the builder that takes it
(``lr: LearningRate``, ``hint_weight: Weight``) or in the table of run-level keys (``kdrun/config/schema.py``).
``check(key, value, hint)`` returns the value or raises a one-line ``KdrunError`` naming the key, the value and
what is allowed. Numbers must be finite, integers must be integers (``True`` is not ``1``).
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from kdrun.core.errors import KdrunError


@dataclass(frozen=True)
class Range:
    """Bounds of a number (any may be None)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x: float) -> bool:
        return not (
            (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
        )

    def describe(self) -> str:
        parts = [
            f"{op} {_number(v)}"
            for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if v is not None
        ]
        return " and ".join(parts)


@dataclass(frozen=True)
class NonEmpty:
    """A list (or string) with at least one element."""


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
OpenFraction = Annotated[float, Range(gt=0, lt=1)]
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
Seed = Annotated[int, Range(ge=0, lt=2**32)]  # numpy and scikit-learn take 32-bit seeds
# Sanity ranges: beyond them a run cannot train (overflow, or a loss term that drowns every other), so they are
# refused before any work instead of failing after the teacher has trained.
Temperature = Annotated[float, Range(gt=0, le=1000)]
LearningRate = Annotated[float, Range(gt=0, le=10)]
Weight = Annotated[float, Range(ge=0, le=1e6)]
Epochs = Annotated[int, Range(ge=1, le=100_000)]
Size = Annotated[int, Range(ge=1, le=1_000_000)]
Width = Annotated[int, Range(ge=1, le=4096)]  # wider: a 3x3 conv of 8192 channels alone holds 604 M weights
Widths = Annotated[tuple[Width, ...], NonEmpty()]
Dropout = Annotated[float, Range(ge=0, lt=1)]


def check(key: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits ``hint``; else a ``KdrunError`` naming ``key``, ``value`` and what is allowed."""
    if not fits(value, hint):
        raise KdrunError(f"{key}={_show(value)} is invalid: must be {describe(hint)}")
    return value


def fits(value: Any, hint: Any) -> bool:  # noqa: PLR0911 - one return per kind of type
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return is_finite_tree(value)
    if origin is Annotated:
        base, *meta = args
        return fits(value, base) and all(_meta_holds(value, m) for m in meta)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint in SCALARS:
        return SCALARS[hint](value)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        item = args[0] if args else Any
        return _is_list(value) and all(fits(v, item) for v in value)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, Mapping) and is_finite_tree(value)
    return True  # a type this checker does not know (e.g. a user's class): nothing to refuse


SCALARS: dict[Any, Callable[[Any], bool]] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    str: lambda v: isinstance(v, str),
}


def describe(hint: Any) -> str:  # noqa: PLR0911 - one return per kind of type
    """What ``hint`` allows, in words (``a number > 0 and <= 1000``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *meta = args
        bounds = " and ".join(m.describe() for m in meta if isinstance(m, Range))
        extra = " (not empty)" if any(isinstance(m, NonEmpty) for m in meta) else ""
        return f"{describe(base)}{' ' + bounds if bounds else ''}{extra}"
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of: " + ", ".join(a if isinstance(a, str) else _show(a) for a in args)
    if hint is bool:
        return "true or false"
    words = {int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        inner = describe(args[0]) if args else ""
        return (
            "a list of any of: " + inner.removeprefix("one of: ")
            if inner.startswith("one of")
            else (f"a list of {_plural(inner)}" if inner else "a list")
        )
    return "a finite value"


def is_finite_tree(value: Any) -> bool:
    """No NaN or infinity anywhere in ``value`` (nested lists and mappings included)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(is_finite_tree(v) for v in value.values())
    if _is_list(value):
        return all(is_finite_tree(v) for v in value)
    return True


def takes(**hints: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the options (and their types) of a builder that reads them from one dict (dataset loaders)."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__kdrun_options__ = hints  # type: ignore[attr-defined]
        return fn

    return mark


def parameter_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The declared type of each keyword parameter of ``fn`` (a function or a class), ``Any`` where none; for a
    builder marked with ``takes``, the options it declares."""
    declared = getattr(fn, "__kdrun_options__", None)
    if declared is not None:
        return dict(declared)
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        resolved = typing.get_type_hints(target, include_extras=True)
    except (NameError, TypeError):  # annotations that name what this module cannot see
        resolved = {}
    params = inspect.signature(fn).parameters
    return {
        n: resolved.get(n, Any)
        for n, p in params.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"
    }


def _meta_holds(value: Any, meta: Any) -> bool:
    if isinstance(meta, Range):
        return meta.holds(value)
    if isinstance(meta, NonEmpty):
        return len(value) > 0
    return True


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes) or type(value).__name__ == "ListConfig"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


def _plural(words: str) -> str:
    return words.removeprefix("an ").removeprefix("a ") + "s" if words.startswith(("a ", "an ")) else words


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value)
