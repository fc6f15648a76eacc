"""One request's state as the coordinator's scheduler sees it: tokens, progress, blocks, deadline.

Progress is a single number, `num_computed`: the tokens `token_ids[:num_computed]` have their
K/V in the blocks of `block_table`. Every step runs some of the rest, `token_ids[num_computed:
num_computed + n]`, at positions starting at `num_computed`; a step that reaches the end of
`token_ids` needs logits, and the token sampled from them is appended. A decode is n = 1, a
prefill chunk is n > 1, and a preempted sequence resumes by running all its tokens again
(prompt and generated ones): one rule, so no phase flag can go stale (vLLM v1's view).

The sequence never touches its blocks itself: the block manager fills `block_table` and
`block_hashes`; the scheduler moves `status` and `num_computed`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..errors import InvalidRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, never admitted: holds no blocks
    RUNNING = "running"  # admitted: holds blocks for all its tokens, scheduled every step it can be
    PREEMPTED = "preempted"  # its blocks were taken back; queued to run all its tokens again
    FINISHED = "finished"  # done for good, see finish_reason; holds no blocks


class FinishReason(enum.Enum):
    STOP = "stop"  # sampled one of its stop tokens
    LENGTH = "length"  # max_new_tokens generated, or the model's context is full
    ABORT = "abort"  # cancelled, or its client went away
    DEADLINE = "deadline"  # its deadline passed before it finished
    KV_BUDGET = "kv_budget"  # its K/V filled the KV pool, which the devices' memory budgets keep below the context


@dataclass(frozen=True)
class SamplingParams:
    """When a sequence stops, plus the per-request sampler settings the model runner reads.

    `sampler` is carried untouched (a galaxy.sampling.SamplingConfig in practice): choosing
    tokens happens next to the logits, the scheduler only needs to know when to stop."""

    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    sampler: object = None
    chunk_size: int | None = None  # most prompt tokens this sequence runs in one step (None: the scheduler's)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise InvalidRequest(f"chunk_size={self.chunk_size!r} must be an integer >= 1 or None")
        bad = [t for t in self.stop_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise InvalidRequest(f"stop_token_ids has {bad}, which are not token ids (integers >= 0)")


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]  # prompt, then every sampled token
    num_prompt: int
    params: SamplingParams
    arrival: float  # seconds, on the scheduler's clock
    deadline: float | None = None  # same clock; None: no deadline
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed: int = 0  # tokens whose K/V are in the blocks
    block_table: list[int] = field(default_factory=list)  # block ids, position p in block_table[p // bs]
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of the full token blocks so far
    num_named: int = 0  # leading blocks of block_table already entered in the prefix cache
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def kernel_from(self) -> int:
        """Its first position whose rows run an int8 / int4 linear's own kernel (model/dense_rows.py): the
        prompt's last token; fixed for the request, so a recompute gives every token its first role."""
        return self.num_prompt - 1

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def stop_reason(self, max_model_len: int, kv_limited: bool = False) -> FinishReason | None:
        """Why the sequence should stop after its last sampled token, if it should (kv_limited:
        max_model_len is the KV pool's end, not the model's)."""
        if self.num_tokens > self.num_prompt and self.token_ids[-1] in self.params.stop_token_ids:
            return FinishReason.STOP
        if self.num_tokens - self.num_prompt >= self.params.max_new_tokens:
            return FinishReason.LENGTH
        if self.num_tokens >= max_model_len:
            return FinishReason.KV_BUDGET if kv_limited else FinishReason.LENGTH
        return None
