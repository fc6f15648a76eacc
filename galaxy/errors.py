"""Typed errors a user of Galaxy can catch; each message says what is wrong and what to do."""

from __future__ import annotations


class GalaxyError(RuntimeError):
    """Base class of every error Galaxy raises on purpose."""


class TransportError(GalaxyError):
    """A peer did not deliver in time, or delivered a tensor of the wrong shape, dtype or size."""


class PeerUnreachable(GalaxyError):
    """A device's worker could not be reached (not running, wrong address, network down)."""


class ProtocolMismatch(GalaxyError):
    """A peer speaks another version of the wire protocol."""


class AuthError(GalaxyError):
    """A peer refused our credentials, or we refused theirs."""


class PlanMismatch(GalaxyError):
    """A plan or partition does not fit the model or the cluster."""


class DeviceOutOfMemory(GalaxyError):
    """A device cannot hold its shard or activations within its memory (budget)."""


class WorkerError(GalaxyError):
    """A worker failed while running a request; the message names the device and the cause."""


class CacheLost(GalaxyError):
    """The devices were re-planned mid-sequence (a fail-over): KV caches must be rebuilt by the caller."""


class InvalidRequest(GalaxyError, ValueError):
    """Input that cannot be served as given (an empty prompt, a token id outside the vocabulary, a
    limit out of range); the message names the field, the value and what is allowed. Nothing was
    queued and no other request is affected."""


class ModelUnloaded(GalaxyError):
    """A model handle used after its session loaded another model in its place (or closed)."""
