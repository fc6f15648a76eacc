"""What a device that drops out does to phase-separated serving (engine/disagg.py), in three pieces.

A disaggregated placement runs two engines on two device groups, and a request lives on one of them
at a time: on the prefill group until its K/V move, then on the decode group. A failure is therefore
told by the group it hit, so the caller can act on it:

- `phase_error`: the error that ends a request names the device (the executor's message does) *and*
  the group it served -- "in the decode group: device 0 'local2' (127.0.0.1:…): unreachable during
  step" -- keeping its type (a PeerUnreachable stays one), so code that catches the colocated
  engine's errors catches these.
- `requeue` / `run_again`: a sequence whose K/V were lost (its group re-planned over its survivors,
  or the group it was on is gone and it moved to the other one) runs all its tokens again, prompt and
  generated, as a preempted sequence does; its next token comes from the last one's logits, so its
  stream goes on with the tokens it would have got.
- `FailOver`: what both engines do, with recovery, when their group fails for good -- the group is
  marked down, and each of its sequences is handed to the other group between steps (never under
  this engine's lock: the other engine's is taken).

Which of them applies when, with and without recovery, is in docs/faults.md ("Phase-separated
serving").
"""

from __future__ import annotations

import logging

from ..errors import GalaxyError, InvalidRequest
from .sequence import SamplingParams

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")


def phase_error(error: BaseException, phase: str) -> BaseException:
    """`error`, its message prefixed with the group whose device failed; the same type, the original
    as its cause. A refusal of the request itself (InvalidRequest) and an error already told are kept
    as they are."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not one of {PHASES}")
    if not isinstance(error, GalaxyError) or isinstance(error, InvalidRequest) or getattr(error, "phase", None):
        return error
    told = type(error)(f"in the {phase} group: {error}")  # every GalaxyError takes its message alone
    told.phase = phase
    told.__cause__ = error
    return told


def requeue(engine, stream, token_ids: list[int], num_prompt: int, params: SamplingParams,
            deadline: float | None) -> None:
    """Queue all of a sequence's tokens on `engine` (caller holds its lock) to run again there: the
    prompt's length, budget and deadline kept, the stream moved to it. Raises what Scheduler.add
    raises (QueueFull, InvalidRequest) without changing anything."""
    again = engine.sched.add(list(token_ids), params)
    again.num_prompt, again.deadline = num_prompt, deadline
    stream.seq, stream.engine = again, engine
    engine.streams[again.seq_id] = stream


def run_again(engine, stream, error: GalaxyError) -> bool:
    """With recovery: a sequence the other group lost (with its K/V) runs all its tokens again on
    `engine` (not holding its lock), which then serves it to the end. If `engine`'s group is gone too,
    or the sequence cannot be queued there, it ends with `error`, which says why. True if queued."""
    gen, seq = stream.generation, stream.seq
    why = "" if engine.down is None else f"that group failed too: {engine.down}"
    if not why:
        try:
            with engine._lock:
                requeue(engine, stream, list(gen.prompt_tokens) + list(gen.tokens), len(gen.prompt_tokens),
                        seq.params, seq.deadline)  # its own budget and deadline
        except GalaxyError as e:
            why = str(e)
    if why:
        told = type(error)(f"{error} (and it could not run again on the other group: {why})")
        told.phase = getattr(error, "phase", None)  # the first group's failure, told once
        stream._end("abort", told)
        return False
    engine._wake.set()
    return True


class FailOver:
    """Mixed into the prefill and the decode engine (before Engine): with recovery, `fallback(stream,
    error)` is the other engine's way in, and a sequence this group lost for good goes there."""

    phase = ""  # "prefill" | "decode": this engine's group, for errors and the log

    def _init_fail_over(self) -> None:
        self.down: GalaxyError | None = None  # with recovery: the failure that took this group out
        self.fallback = None  # with recovery: fallback(stream, error) takes a sequence this group lost
        self._lost: list = []  # (stream, error) for the fallback, handed over outside this engine's lock

    def _fail_over(self, seq_id: int, stream, error: GalaxyError) -> None:
        """The group is down: the sequence leaves it, to be handed over between steps (caller holds the lock)."""
        if self.down is None:
            other = "decode" if self.phase == "prefill" else "prefill"
            log.warning("the %s group failed (%s): its sequences run again on the %s group, which serves every "
                        "request from now on", self.phase, error, other)
            self.down = error
        del self.streams[seq_id]
        self._lost.append((stream, error))
        self._wake.set()

    def _hand_over(self) -> None:
        """Hand the lost sequences to the other group (the loop's thread, not holding this lock)."""
        with self._lock:
            lost, self._lost = self._lost, []
        for stream, error in lost:
            self.fallback(stream, error)

    def _end_lost(self, error: GalaxyError | None) -> None:
        """The engine closes: sequences not handed over yet end with `error` (caller holds the lock)."""
        lost, self._lost = self._lost, []
        for stream, _ in lost:
            stream._end("abort", error or GalaxyError("the engine was closed before this request finished"))
