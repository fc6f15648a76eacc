"""What a generation request asks for and what it gets back: the records the engine fills in.

`GenerationConfig` is a request's settings; `Generation` is its result as it grows (tokens, text,
finish reason, and per engine step the tokens it ran and how long the step took, from which TTFT
and time per output token follow); `TokenEvent` is what a stream yields. Stop strings are held
back while streaming until it is clear whether they complete (`pending_stop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidRequest
from ..parallel.executor import DeviceStats
from .arguments import need_int, stop_strings
from .sampling import SamplingConfig

# kv_budget: the sequence filled the KV pool the devices' memory budgets allow (OpenAI: "length")
FINISH_REASONS = ("length", "eos", "stop", "abort", "deadline", "kv_budget")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_at_eos: bool = True
    prefill_chunk: int = 0  # most prompt tokens per step for this request (0: the engine's budget)

    def __post_init__(self):  # InvalidRequest (a GalaxyError and a ValueError) naming the field
        need_int("max_new_tokens", self.max_new_tokens, 0)
        need_int("prefill_chunk", self.prefill_chunk, 0)
        if not isinstance(self.sampling, SamplingConfig):
            raise InvalidRequest(f"sampling={self.sampling!r}: must be a SamplingConfig")
        object.__setattr__(self, "stop", stop_strings(self.stop))


@dataclass
class StepTiming:
    """One engine step as one request saw it."""

    phase: str  # "prefill" (a chunk of its prompt, or of its tokens again after a preemption) | "decode"
    tokens: int  # this request's tokens in the step
    seconds: float  # the whole step's wall time (it ran beside the other requests of the batch)
    collective: str  # how the joins ran: "ring ReduceScatter/AllGather (HMP)", "direct all-reduce", ...
    batch_tokens: int = 0  # every request's tokens in the step


@dataclass
class KVHandoff:
    """A sequence's move from the prefill group to the decode group (phase-separated serving,
    engine/disagg.py): its K/V pulled from the prefill devices, re-sharded, pushed to the decode ones."""

    at_token: int  # tokens generated when it moved (1: right after the first)
    nbytes: int  # K/V bytes moved
    export_s: float  # pulling them from the prefill devices
    waited_s: float  # held at the coordinator until the decode group had room
    import_s: float  # pushing them into the decode devices
    adopted_s: float  # seconds since submission when the decode group held them
    # streamed while the prompt was prefilled (engine/kv_stream.py): of the pulls and pushes, the time that
    # ran before the first token (hidden_s) and the time from the first token until the K/V were all on the
    # decode group (exposed_s); moved after the prefill, nothing is hidden and exposed_s is the whole move
    hidden_s: float = 0.0
    exposed_s: float = 0.0
    streamed: bool = False
    direct: bool = False  # sent in one hop, prefill devices to decode devices (engine/kv_direct.py)

    @property
    def transfer_s(self) -> float:
        return self.export_s + self.import_s


@dataclass
class TokenEvent:
    """What the stream yields: a token and the text it added (may be '' mid-character)."""

    token: int
    text: str


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = ""  # one of FINISH_REASONS
    steps: list[StepTiming] = field(default_factory=list)
    reused_prefix: int = 0  # prompt tokens whose K/V came from the prefix cache
    kv_cache_bytes: list[int] = field(default_factory=list)  # per device, after the last step
    queued_s: float = 0.0  # from submission to its first step
    first_token_s: float | None = None  # from submission to the first token (TTFT, queueing included)
    token_times: list[float] = field(default_factory=list)  # seconds since submission of every token
    handoff: KVHandoff | None = None  # phase-separated serving: its move to the decode group

    @property
    def ttft_s(self) -> float:
        """Time to first token: waiting for a place in the batch, then every step until it comes out."""
        if self.first_token_s is not None:
            return self.first_token_s
        return self.queued_s + sum(s.seconds for s in self.steps if s.phase == "prefill")

    @property
    def per_token_s(self) -> float:
        """Time per output token after the first (TPOT)."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0


def collective_of(devices: list[DeviceStats]) -> str:
    """How a pass's joins ran, from the collectives' tags on the first device."""
    tags = {op.tag for op in devices[0].ops} if devices else set()
    if any(t.endswith(".direct") for t in tags):
        return "direct all-reduce (1 hop)"
    if any(t.endswith(".2shot") for t in tags):
        return "two-shot all-reduce (2 hops)"
    if any(".ar." in t for t in tags):
        return "ring all-reduce"
    if any(t.endswith(".rs") for t in tags):
        return "ring ReduceScatter/AllGather (HMP)"
    if any(t.startswith("pipe") for t in tags):
        return "pipeline hand-off"
    return "none (1 device)"


def pending_stop(text: str, stops) -> int:
    """Length of the longest tail of `text` that is the beginning of a stop string (held back
    while streaming, until it is clear either way)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
