"""Typed errors a user of Galaxy can catch; each message says what is wrong and what to do."""

from __future__ import annotations


class GalaxyError(RuntimeError):
    """Base class of every error Galaxy raises on purpose."""


class TransportError(GalaxyError):
    """A peer did not deliver in time, or delivered a tensor of the wrong shape, dtype or size."""


class FrameRejected(TransportError):
    """A peer's tensor frame was refused: a malformed or oversized header, data of another size,
    shape or dtype than the collective expects, or a frame out of sequence. The link is out of step
    after it; the request fails at once instead of waiting for what will never come."""


class KVTransferError(TransportError):
    """K/V moved between two partitions (phase-separated serving) that do not fit where they go: a box
    of the wrong shape, dtype or size, layers or heads the device does not hold, blocks outside its
    pool. Refused before the pool is touched."""


class KVDirectFailed(KVTransferError):
    """A direct K/V move (a prefill worker sending a box straight to a decode worker, transport/kv_ticket.py)
    that did not land: the receiver could not be reached from the sender, refused the box or its ticket, or
    did not answer in time. The engine moves that sequence's K/V through the coordinator instead."""


class KVStreamStalled(KVTransferError):
    """A prompt's K/V streaming to the decode group (engine/kv_stream.py) in which no box moved for the
    stall timeout: a device stopped answering, or the decode group stopped taking boxes."""


class PeerUnreachable(GalaxyError):
    """A device's worker could not be reached (not running, wrong address, network down)."""


class NotAWorker(PeerUnreachable):
    """Something answered at a device's address, but not a Galaxy worker (a web server, another
    service, a process that accepts connections and says nothing); the message says what answered."""


class ProtocolMismatch(GalaxyError):
    """A peer speaks another version of the wire protocol."""


class AuthError(GalaxyError):
    """A peer refused our credentials, or we refused theirs."""


class PlanMismatch(GalaxyError):
    """A plan or partition does not fit the model or the cluster."""


class RowsOutsidePass(GalaxyError):
    """A linear was called, inside a pass, on rows the pass does not hold (model/dense_rows.py): which of them
    run dense cannot be told, and a guess would give those tokens other numerics."""


class DeviceOutOfMemory(GalaxyError):
    """A device cannot hold its shard or activations within its memory (budget)."""


# What torch's CPU allocator says when it cannot allocate (a RuntimeError, not MemoryError: torch 2.13)
ALLOC_FAILED = "can't allocate memory"


def allocation_failed(e: BaseException) -> bool:
    """Whether `e` is a failed memory allocation: Python's MemoryError, torch's OutOfMemoryError, or the RuntimeError
    torch's CPU allocator raises (its message is the signal: other RuntimeErrors are bugs, not a full device)."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and not isinstance(e, GalaxyError) and ALLOC_FAILED in str(e))


class WorkerError(GalaxyError):
    """A worker failed while running a request; the message names the device and the cause."""


# What a worker says of a session it does not hold (dropped for room, restarted, released): its words are the
# signal, as the gRPC status (FAILED_PRECONDITION) is shared with other refusals
NO_SESSION = "no loaded session"


def lost_session(e: BaseException) -> bool:
    """Whether `e` is a worker saying it no longer holds the session asked of it."""
    return isinstance(e, GalaxyError) and NO_SESSION in str(e)


class CacheLost(GalaxyError):
    """The devices were re-planned mid-sequence (a fail-over): KV caches must be rebuilt by the caller."""


class InvalidRequest(GalaxyError, ValueError):
    """A call's argument is out of range or of the wrong type (an empty prompt, max_new_tokens=-1,
    top_p=0, a token id outside the vocabulary, ...). The message names the argument, the value given
    and what is allowed; nothing was queued and no other request is affected. Also a ValueError, so
    code written against the plain Python convention catches it too."""


class KVBudgetExceeded(InvalidRequest, DeviceOutOfMemory):
    """A prompt whose K/V cannot fit the serving engine's KV pool -- what the smallest device's KV
    budget holds -- however it is scheduled: refused when submitted, before any step, with the
    prompt's length and the pool's positions. (A sequence that reaches the pool's end while
    generating is not an error: it finishes with reason "kv_budget".)"""


class ModelUnloaded(GalaxyError):
    """A `Model` was used after its session loaded another model (or was closed): the devices now
    hold something else, so the handle refuses to run instead of returning the other model's output."""


class Overloaded(GalaxyError):
    """Early rejection (engine/admission.py, Mooncake's): the serving engine predicts that a new request's
    time to first token would exceed the objective it serves under (`EngineConfig.slo_ttft`), so it refused
    the request at once rather than queue it to miss. Nothing was queued and no other request is affected.
    The attributes say why and when to retry (`galaxy serve` answers HTTP 503 with them and Retry-After)."""

    def __init__(self, message: str, *, predicted_ttft_s: float, slo_ttft_s: float, waiting: int, running: int,
                 queued_prompt_tokens: int, retry_after_s: int):
        super().__init__(message)
        self.predicted_ttft_s, self.slo_ttft_s = predicted_ttft_s, slo_ttft_s
        self.waiting, self.running, self.queued_prompt_tokens = waiting, running, queued_prompt_tokens
        self.retry_after_s = retry_after_s  # whole seconds, >= 1: the predicted drain time

    def details(self) -> dict:
        return {"predicted_ttft_s": round(self.predicted_ttft_s, 3), "slo_ttft_s": self.slo_ttft_s,
                "waiting": self.waiting, "running": self.running,
                "queued_prompt_tokens": self.queued_prompt_tokens, "retry_after_s": self.retry_after_s}
