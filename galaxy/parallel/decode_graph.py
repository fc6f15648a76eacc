"""A one-token decode step's block halves as inductor-compiled graphs, shared by every layer (issue #20).

Why: a decode step of one token on a small model is bound by per-op overhead as much as by reading the
weights. SmolLM2 in int4 runs about 50 eager ops a layer (norms, the kernels' bf16 / float32
conversions, RoPE's split and rotation, the residual adds, the MLP's activation), a few microseconds
each: measured, the engine step took 18.5 ms where its matmuls alone take about 10.5
(docs/decode-formats.md). Compiled, each half is one call.

What is compiled, per layer of a step of exactly one token (`Pass` of one row; a batch of decodes or a
prompt chunk runs eagerly: one graph per token count would compile mid-serving):

- `pre`: norm1, the Q|K|V projection, the split into heads and RoPE -> q (nq, 1, hd), k, v (nkv, 1, hd);
- the paged K/V write and attention stay eager (`Attention.attend_paged_heads`: the context length grows
  every step, and the KV pool is written in place);
- `post` (one device: nothing between the output projection and the residual): the output projection,
  the residual add, norm2 and the MLP -> the new residual and the MLP's output; with peers, the output
  projection's partial sum is all-reduced first and `mlp` runs the rest.

One graph serves every layer: the layer's weights are the graph's inputs (`torch.func.functional_call`
over the block, traced once by `make_fx` and compiled by `torch._inductor.compile`), not constants, so
every layer of a shard (the same shapes) calls the same code. Without Dynamo there are no guards to
evaluate per call (a `torch.compile`d add took 23 us a call here against 3 us eager; the inductor
graph called directly, as cheap as the eager add); the inputs' shapes are fixed by construction and
checked once per step by `fits`.

Exactness: the graphs run the same ops in float32 as the eager blocks, and inductor fuses some of them. A
review (session 6) called one layer's `post` 300 times on SmolLM2's widths: 79 calls differed from eager in
fp32, 2 in int4. The cause is RMSNorm's mean of squares, which inductor sums in its own order (73-80 of 300
norms differed alone; silu(gate) * up, the bf16 conversions and the rest gave eager's bits): so the graphs
are compiled with `aten.mean.dim` as aten's own kernel (`_aten_means`). With it, in int4 a decode alone
(compiled) and the same decode in a batch (eager) give bit-identical logits (128 rows of 4 sequences,
32 tokens, SmolLM2's widths: the engine's promise, which int4's bf16 activations make a promise of bits);
in fp32 a lone row's linears are MKL's gemv and a batch's its gemm, within 1e-5, as without graphs.
The traced graphs are bit-identical to eager (tests/parallel/test_decode_graph.py pins torch.equal); the
suite never runs inductor (seconds).
Any failure to build or to run falls back to the eager step for the rest of the load (alone), with the
reason logged. With peers (a split) a step that fails mid-way ends on every rank, and only a graph's own
error (`GraphFailed`: raised inside a compiled half, which would raise again every step) turns the graphs
off on its rank; a collective's error around them (a peer gone, the step aborted) leaves them on.

When: `policy()` -- `GALAXY_DECODE_COMPILE=0` never (the test suite sets it: compile time must not land
in tests), `=1` whenever eligible, unset: when eligible, the device decodes alone (a partition of one: the
in-process device, or the worker the planner's decode layout gives the whole model; a split's step waits
on its collectives more than on its ops, and several workers compiling at once on one host would slow
every load) and the shard's block weights hold at least AUTO_MIN_BYTES (a tiny model's step costs
microseconds, its compile seconds); `=traced` builds the graphs
and runs them as traced, uncompiled (the tests' check of the tracing, the weights-as-inputs and the
step's wiring, in a fraction of a second; inductor's code generation is torch's own). Eligible: a shard with
layers whose linears are plain aten kernels (fp32 `nn.Linear`, int8 and int4 `QuantLinear`; oneDNN's and
fbgemm's packed weights are opaque objects a graph cannot take as an input), every layer the same
structure, RoPE, pre-norm. Compiled at load (`RankRuntime.prepare_decode`): about 5-20 s the first time
on this host, much less from inductor's on-disk cache after.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager

import torch
from torch import nn

from ..model.quant import QuantLinear
from ..model.transformer import Block, Transformer

log = logging.getLogger(__name__)

COMPILE_ENV = "GALAXY_DECODE_COMPILE"
AUTO_MIN_BYTES = 16 << 20  # block weights below this: the eager step is already fast; compiling costs seconds


class GraphFailed(Exception):
    """A compiled half itself raised (its cause is the error): not a collective or the attention between the
    halves, so the next step would fail the same way."""


_MEANS_LOCK = threading.Lock()


@contextmanager
def _aten_means():
    """Within: inductor runs `aten.mean.dim` as aten's own kernel (a fallback), not its own reduction.

    Why: RMSNorm's mean of squares, as inductor generates it, sums a row in another order than aten's
    kernel: compiled on SmolLM2's widths, 73-80 of 300 norms differed from eager in the last bit, and with
    int4's bf16 activations that gave a lone decode (compiled) other logits than the same decode in a batch
    (eager) some dozens of tokens on. With the fallback every other op of the halves gave eager's bits
    (measured: int4 lone vs batched, 128 logit rows bit-equal); fp32 keeps MKL's gemv / gemm difference.
    The lowering is put back after (its entry, and the op's place in inductor's `fallbacks` and
    `needs_realized_inputs` sets, which other compiles read), so nothing compiled later in the process
    changes; the compile's cache key carries `_means_key`'s uuid, so a graph cached without the fallback
    is never reused for one with it. Builds take `_MEANS_LOCK`: two sessions loading at once in one process
    would otherwise interleave their save and restore and leave the fallback in for good. (A compile of
    someone else's running in another thread meanwhile still sees it: inductor's tables are global.)"""
    from torch._inductor import config
    from torch._inductor import lowering as lw

    op = torch.ops.aten.mean.dim
    with _MEANS_LOCK:
        saved = lw.lowerings.get(op)
        realized, fallback = op in lw.needs_realized_inputs, op in lw.fallbacks
        try:
            lw.make_fallback(op, warn=False, override_decomp=True)
            with config.patch(post_grad_custom_pre_pass=_means_key()):
                yield
        finally:
            if saved is None:
                lw.lowerings.pop(op, None)
            else:
                lw.lowerings[op] = saved
            if not realized:
                lw.needs_realized_inputs.discard(op)
            if not fallback:
                lw.fallbacks.discard(op)


def _means_key():
    """A pass that changes nothing: its uuid is in inductor's cache key (see `_aten_means`)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class AtenMeansKey(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return "galaxy.decode_graph: aten.mean.dim as aten's kernel, v1"

    return AtenMeansKey()


class _Half(nn.Module):
    """A block half: its forward is what the graph computes, the block's weights its state."""

    def __init__(self, blk: Block):
        super().__init__()
        self.blk = blk


class _Pre(_Half):
    """norm1 -> Q|K|V -> heads, RoPE at (cos, sin): (1, H) -> q (nq, 1, hd), k, v (nkv, 1, hd)."""

    def forward(self, x, cos, sin):
        attn = self.blk.attn
        return attn.split_heads(attn.project(self.blk.attn_input(x)), rot=(cos, sin))


class _Mlp(_Half):
    """Residual with the all-reduced attention sum, norm2, MLP: x, a (1, H) -> x (1, H), MLP output (1, H)."""

    def forward(self, x, a):
        blk = self.blk
        x = blk.after_attn(x, a)
        return x, blk.mlp.contract(blk.mlp.expand(blk.mlp_input(x)))


class _Post(_Mlp):
    """Output projection, then _Mlp: ctx (1, nq hd), x (1, H) -> x (1, H), MLP output (1, H)."""

    def forward(self, ctx, x):
        return super().forward(x, self.blk.attn.project_out(ctx))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))


def block_bytes(model: Transformer) -> int:
    """Bytes of the shard's block weights (what a decode step streams besides the head)."""
    seen, total = set(), 0
    for blk in model.layers.values():
        for t in _state(blk).values():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def ineligible(model: Transformer) -> str | None:
    """Why the shard's decode step cannot run through the graphs (None: it can)."""
    cfg = model.cfg
    if not len(model.layers):
        return "no layers"
    if not cfg.causal or cfg.position != "rope" or not cfg.pre_norm:
        return "not a pre-norm RoPE decoder"
    blocks = list(model.layers.values())
    for m in blocks[0].modules():
        if isinstance(m, QuantLinear) and m.handle is not None:
            return f"{m.fmt} weights are an opaque packed object"
    first = {k: (t.shape, t.dtype) for k, t in _state(blocks[0]).items()}
    if any({k: (t.shape, t.dtype) for k, t in _state(b).items()} != first for b in blocks[1:]):
        return "the layers differ in structure"
    return None


def policy(model: Transformer, world: int) -> bool:
    """Whether to compile the decode halves of this shard of a `world`-device partition (module docstring:
    `GALAXY_DECODE_COMPILE`)."""
    want = os.environ.get(COMPILE_ENV, "").strip()
    if want == "0" or ineligible(model) is not None:
        return False
    return want in ("1", "traced") or (world == 1 and block_bytes(model) >= AUTO_MIN_BYTES)


@contextmanager
def _one_compile_thread():
    """Within: inductor compiles with one thread, not its pool of compile workers.

    Why: the pool runs one worker per core (up to 32), each able to run a C++ compile (~250 MiB of cc1plus
    on SmolLM2), so the build's peak was counted per worker (288 MiB each): ~1.9 GiB on a 6-core Jetson,
    ~9 GiB on a 32-core host, past what a budgeted device holds, and the build was refused there. The
    three small graphs gain nothing measurable from parallel compiling (on this 2-core host one thread
    built as fast as two workers); with one thread the peak is one figure on every host
    (memory.decode_compile_bytes, measured with it)."""
    from torch._inductor import config

    with config.patch(compile_threads=1):
        yield


class _Graph:
    """One block half compiled once, called with any layer's weights."""

    def __init__(self, half: type[_Half], blocks: list[Block], example: tuple[torch.Tensor, ...]):
        from torch.fx.experimental.proxy_tensor import make_fx

        wrap = half(blocks[0])
        names = list(_state(wrap))

        def fn(*flat):
            return torch.func.functional_call(wrap, dict(zip(names, flat[: len(names)])), flat[len(names):])

        inputs = [*_state(wrap).values(), *example]
        gm = make_fx(fn)(*inputs)
        if os.environ.get(COMPILE_ENV) == "traced":
            self.fn = gm
        else:
            with _aten_means(), _one_compile_thread():
                self.fn = torch._inductor.compile(gm, inputs)
        # each layer's weights in the graph's input order, gathered once
        self.weights = {id(b): tuple(_state(half(b)).values()) for b in blocks}
        self.shapes = tuple((t.shape, t.dtype) for t in example)
        self.example = example

    def __call__(self, blk: Block, *args: torch.Tensor):
        try:
            out = self.fn(*self.weights[id(blk)], *args)
        except Exception as e:
            raise GraphFailed(str(e)) from e
        return tuple(out)


class DecodeGraphs:
    """The compiled halves of a shard's one-token decode step; `None` from `build` when not compiled."""

    def __init__(self, model: Transformer):
        cfg = model.cfg
        blocks = list(model.layers.values())
        attn, h = blocks[0].attn, cfg.hidden
        x = torch.zeros(1, h)
        cos, sin = attn.rotation(torch.zeros(1, dtype=torch.long))
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.pre = _Graph(_Pre, blocks, (x, cos, sin))
            self.post = _Graph(_Post, blocks, (torch.zeros(1, attn.nq * cfg.head_dim), x))
            self.mlp = _Graph(_Mlp, blocks, (x, torch.zeros(1, h)))  # distinct tensors: a traced alias is one input
            for g in (self.pre, self.post, self.mlp):
                g(blocks[0], *g.example)  # a first call: anything left to build is built now, not on a request
        self.compile_s = time.perf_counter() - t0
        self.failed: str | None = None

    @classmethod
    def build(cls, model: Transformer, world: int = 1) -> DecodeGraphs | None:
        """Compile the halves if `policy` says so; on any failure, None (eager), the reason logged."""
        if not policy(model, world):
            return None
        try:
            graphs = cls(model)
        except Exception as e:  # noqa: BLE001 - no compiler, an op inductor cannot take: eager still works
            log.warning("compiling the decode step failed, decoding eagerly: %s", str(e).splitlines()[0])
            return None
        log.info("decode step compiled in %.1f s (%d layers share its graphs)", graphs.compile_s, len(model.layers))
        return graphs

    def fits(self, x: torch.Tensor) -> bool:
        """Whether a step's residual stream is the graphs' (one float32 contiguous row): checked once a step."""
        return self.failed is None and x.shape == self.pre.shapes[0][0] and x.dtype == torch.float32 \
            and x.is_contiguous()

    def fail(self, e: BaseException) -> None:
        """A graph raised: every later step runs eagerly (this one is re-run eagerly by the caller)."""
        self.failed = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("the compiled decode step failed, decoding eagerly from now on: %s", self.failed)
