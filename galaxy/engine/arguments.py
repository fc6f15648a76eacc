"""Checks on what a caller passes to the Python API, each raising `InvalidRequest` that names the
argument, the value given and what is allowed.

The API is called from apps (and the HTTP server, and the CLI) with values that come from users.
Without these checks a bad value surfaces deep inside as a TypeError from a comprehension, a
ValueError from torch, or -- worse -- a worker error after the devices did work; one typed error
up front is something a caller can catch (`except galaxy.GalaxyError`, or `except ValueError`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np
import torch

from ..errors import InvalidRequest

# what torch.Generator.manual_seed accepts
SEED_RANGE = (-(2**63), 2**64 - 1)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    """An integer that is not a bool (True is an int to Python, not a count to a caller)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def need_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (either bound optional)."""
    if not is_int(value):
        raise InvalidRequest(f"{name}={_shown(value)}: must be an integer, got {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise InvalidRequest(f"{name}={value}: must be >= {low}")
    if high is not None and value > high:
        raise InvalidRequest(f"{name}={value}: must be <= {high}")
    return value


def need_number(name: str, value, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] ((low, high] with low_open)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise InvalidRequest(f"{name}={_shown(value)}: must be a number, got {type(value).__name__}")
    given, value = value, float(value)
    if not math.isfinite(value):
        raise InvalidRequest(f"{name}={given}: must be a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise InvalidRequest(f"{name}={given}: must be {'>' if low_open else '>='} {low:g}")
    if high is not None and value > high:
        raise InvalidRequest(f"{name}={given}: must be <= {high:g}")
    return value


def need_seed(name: str, value) -> int | None:
    return None if value is None else need_int(name, value, *SEED_RANGE)


def stop_strings(stop) -> tuple[str, ...]:
    """None, one string, or an iterable of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    elif not isinstance(stop, Iterable) or isinstance(stop, (bytes, dict)):
        raise InvalidRequest(f"stop={_shown(stop)}: must be a string or a list of strings")
    out = tuple(stop)
    bad = [s for s in out if not isinstance(s, str) or not s]
    if bad:
        raise InvalidRequest(f"stop={_shown(out)}: every stop string must be non-empty text, got {_shown(bad[0])}")
    return out


def token_ids(name: str, ids, vocab_size: int) -> list[int]:
    """A non-empty 1-D sequence of token ids (list, tuple, numpy or torch), each in [0, vocab_size)."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        integer = (np.issubdtype(ids.dtype, np.integer) if isinstance(ids, np.ndarray)
                   else not (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool))
        if ids.ndim != 1 or not integer:
            raise InvalidRequest(f"{name}: token ids must be a 1-D integer array, got shape {tuple(ids.shape)} "
                                 f"of {ids.dtype}")
        ids = ids.tolist()
    elif isinstance(ids, (list, tuple)):
        wrong = [t for t in ids if not is_int(t)]
        if wrong:
            raise InvalidRequest(f"{name}: token ids must be integers, got {_shown(wrong[0])} "
                                 f"({type(wrong[0]).__name__})")
        ids = [int(t) for t in ids]
    else:
        raise InvalidRequest(f"{name}={_shown(ids)}: must be text (str) or token ids (a list of ints), "
                             f"got {type(ids).__name__}")
    if not ids:
        raise InvalidRequest(f"{name}: no token ids; give at least one")
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise InvalidRequest(f"{name}: token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def need_choice(name: str, value, choices) -> str:
    if value not in tuple(choices):
        raise InvalidRequest(f"{name}={_shown(value)}: must be one of {', '.join(map(repr, choices))}")
    return value
