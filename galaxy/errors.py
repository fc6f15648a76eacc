"""Typed errors a user of Galaxy can catch; each message says what is wrong and what to do."""

from __future__ import annotations


class GalaxyError(RuntimeError):
    """Base class of every error Galaxy raises on purpose."""


class TransportError(GalaxyError):
    """A peer did not deliver in time, or delivered a tensor of the wrong shape, dtype or size."""
