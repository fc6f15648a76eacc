"""The memory a device needs for its shard: one model, used by the planner and the worker alike.

A worker process is capped by its memory budget (`galaxy worker --memory-budget`; on an emulated
device, the cgroup limit less a little slack). Whether a shard fits is decided three times: when
the planner splits the model (planner/profiler.py turns a device's budget into the room its
profile offers the solver), when the coordinator checks a split before it pushes any weight
(transport/client.py), and when the worker admits a push or a load (transport/worker.py). All
three call the functions here with the same inputs -- what the process holds now, the shard, the
transient of a load, the KV cache and the activations at the planned length -- so a plan that
says it fits loads and runs, and a split that does not fit is refused before any weight moves.

What a device holds, in the order a load goes (bytes; `MemoryParams` has the element sizes):

    resident      the process before the shard: Python, torch, gRPC (an idle worker ~234 MiB),
                  less what its other sessions hold, which a load may drop
    weights       the shard's parameters x `weight_bytes` (4 fp32, 2 bf16; compact formats set theirs)
    transient     what a load holds beside the finished weights, briefly: a streamed shard is
                  received straight into its final tensors, so only a few chunks in flight
                  (`PUSH_TRANSIENT`); a shard read from a file also maps the file's pages and
                  dequantizes one whole tensor at a time (`file_transient_bytes`)
    kv            K and V of the device's KV heads for every position reserved (`kv_cache_bytes`)
    activations   the peak of one pass's intermediate tensors (`layer_activation_bytes`)
    reply         that pass's output when it returns every token's row (`output_bytes`): what
                  `galaxy run --seq-len N --check` runs after its load; no KV pool is allocated for
                  it and the load's transient is gone, so it counts in place of transient + kv

After the load, what the budget leaves beside the loaded process, a pass at the reserved length
(`pass_reserve`) and RESIDENT_DRIFT is the serving engine's paged KV pool on that device
(`kv_pool_budget`): the pool is allocated whole at the engine's first step, so a device never
grows past its budget while it generates; the engine's pool is the smallest device's share.
What a device has beyond the engine's pool (a larger device, or a pool cut with --kv-blocks) may hold a
device-local store of evicted prefix blocks (`stash_room`, parallel/kv_stash.py): opened with a fixed budget
that must fit beside the plan when the engine starts, and counted in what the worker holds from then on.

`shard_need` adds them; `room` is what a budget leaves beside the resident process. The planner's
per-device budget is `room(budget, resident) - transient`, within which the solver fits
weights + `activation_bytes` (activations and KV together): the worker's admission is the same
sum. The transient and a pass never overlap in time, so the sum is a little conservative.

Every constant below was measured on this machine (2 vCPU EPYC, torch 2.13 CPU, glibc with the
workers' MALLOC_ENV); each says how.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DeviceOutOfMemory
from ..model.config import ModelConfig
from ..model.dense_rows import scratch_bytes
from ..model.quant import INT4_ROWS, QuantLinear, WeightFormat, parse_format
from .forward import Request, decodes_tensor_parallel
from .sharding import Partition, ShardSpec, Strategy

MiB = 1 << 20

# A streamed tensor travels in chunks of this many bytes; the worker copies each into the tensor it
# allocated for it, so no message ever holds a whole tensor. Smaller chunks also keep gRPC's own
# buffering down: a push's peak beyond the shard was 21-65 MiB with 1 MiB chunks, 13-34 MiB with 64 KiB
# (SmolLM2 fp32 split 2 and 4 ways over loopback workers, 3 pushes each).
PUSH_CHUNK_BYTES = 64 * 1024
# What a push holds beyond the shard: gRPC's buffers (measured above: at most 34 MiB), with a margin.
PUSH_TRANSIENT = 48 * MiB
# A pass's fixed costs -- gRPC buffers, request and reply messages, Python objects: the resident
# growth of a 256-token prefill beyond its live tensors was 10-13 MiB (SmolLM2 and GPT-2, 1-3 devices).
RUN_SLACK = 16 * MiB
# The workers' allocator keeps freed memory in its heap (transport/spawn.MALLOC_ENV: no trimming,
# buffers up to 256 MiB from the heap), so a pass grows the resident set by more than the bytes
# alive at once. Measured peak RSS growth less RUN_SLACK over `layer_live_elements` bytes, prefills
# of 256-4,096 tokens with a KV cache, 3 repeats each, SmolLM2 and GPT-2 split 1-3 ways: 0.74-1.58.
HEAP_FACTOR = 1.6
# A reply is held twice at most: the output tensor and the wire bytes serialized straight from it,
# then those bytes and gRPC's copy (transport/protocol.TensorReply). A budgeted worker's resident
# growth through a 1,024-token full-logits pass and its reply's serialization, over the logits'
# bytes (96 MiB each, two workers, tests/transport/test_reply_memory.py, 3 runs): 2.02-2.05, where
# filling the protobuf message first grew it 3.0x.
OUTPUT_COPIES = 2.5
DEFAULT_SEQ_LEN = 512  # tokens a load reserves KV and activations for when none is given
# Kept free when a split is sized ahead of its load (a plan, or the split a session makes without
# one): the worker's resident memory may grow a little before it admits the load -- gRPC's buffers
# after the push, heap pages the allocator cannot give back -- and it admits by what it holds then.
RESIDENT_DRIFT = 16 * MiB


@dataclass(frozen=True)
class MemoryParams:
    """Element sizes. weight_bytes: one parameter as the device holds it; act_bytes: one activation
    or KV element (the compute dtype); push_bytes: one parameter as it is received or read (the
    coordinator streams float32). weights_format: how the linears are held (model.quant.parse_format
    syntax): a compact format holds them at `linear_held_bytes` each, every other parameter (embedding,
    head, norms, biases) at weight_bytes."""

    weight_bytes: float = 4.0
    act_bytes: int = 4
    push_bytes: float = 4.0
    weights_format: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "act_bytes", "push_bytes"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"MemoryParams.{name}={v!r} must be positive")
        parse_format(self.weights_format)  # a FormatError naming it, now rather than mid-load

    @classmethod
    def for_dtype(cls, itemsize: int, weights_format: str = "fp32") -> MemoryParams:
        """Weights and activations in a compute dtype of `itemsize` bytes (pushed as float32), the
        linears held in `weights_format`."""
        return cls(float(itemsize), int(itemsize), 4.0, weights_format)

    @property
    def compact(self) -> WeightFormat | None:
        """The compact format the linears are held in; None for fp32 (held at weight_bytes)."""
        fmt = parse_format(self.weights_format)
        return None if fmt.name == "fp32" else fmt


# --- what a shard holds ---------------------------------------------------------------------------

def kv_heads_touched(cfg: ModelConfig, h0: int, h1: int) -> int:
    """KV heads a device holding query heads [h0, h1) computes and caches (a partly held group's KV
    head is replicated on each device holding part of it)."""
    return 0 if h1 <= h0 else -(-h1 // cfg.group) - h0 // cfg.group


def kv_heads_bound(cfg: ModelConfig, heads: int) -> int:
    """The most KV heads any contiguous run of `heads` query heads touches (the planner knows counts,
    not positions): a run may start mid-group, so one more group than its length fills."""
    if heads <= 0:
        return 0
    if cfg.group == 1:
        return heads
    return min(cfg.n_kv_heads, -(-heads // cfg.group) + 1)


def shard_params(cfg: ModelConfig, spec: ShardSpec) -> int:
    """Parameters a device holds for `spec`, the tied head counted once (= sharding.shard_bytes /
    element size, without building the module tree: ~50 ms for a large model, this is arithmetic)."""
    hid, hd = cfg.hidden, cfg.head_dim
    norm = hid * (2 if cfg.norm == "layernorm" else 1)
    v = spec.vocab[1] - spec.vocab[0]
    n = 0
    if spec.embed:
        n += v * hid + cfg.type_vocab_size * hid + (norm if cfg.embed_norm else 0)
        if cfg.position == "learned":
            n += (cfg.max_positions + cfg.position_offset) * hid
    nq = spec.heads[1] - spec.heads[0]
    qkv = (nq + 2 * kv_heads_touched(cfg, *spec.heads)) * hd
    c = spec.cols[1] - spec.cols[0]
    layer = 2 * norm + hid * qkv + (qkv if cfg.attn_bias else 0) + nq * hd * hid + (hid if cfg.out_bias else 0)
    layer += (2 if cfg.gated_mlp else 1) * (hid * c + (c if cfg.mlp_bias else 0)) + c * hid
    layer += hid if cfg.mlp_bias else 0
    n += (spec.layers[1] - spec.layers[0]) * layer
    if spec.head:
        n += norm if cfg.final_norm else 0
        if cfg.causal and not (cfg.tie_embeddings and spec.embed):
            n += v * hid
    return n


def shard_linears(cfg: ModelConfig, spec: ShardSpec) -> list[tuple[int, int]]:
    """(N, K) of every non-empty linear weight one layer of `spec` holds in a compact format
    (parallel/compact.py) -- Q|K|V, the output projection, [gate; up] as one (2c, H) matrix (or up),
    down -- the matrices it converts and a compact push carries."""
    hid, hd = cfg.hidden, cfg.head_dim
    nq, c = spec.heads[1] - spec.heads[0], spec.cols[1] - spec.cols[0]
    qkv = (nq + 2 * kv_heads_touched(cfg, *spec.heads)) * hd
    mats = [(qkv, hid), (hid, nq * hd), ((2 if cfg.gated_mlp else 1) * c, hid), (hid, c)]
    return [(n, k) for n, k in mats if n * k]


def linear_held_bytes(n: int, k: int, fmt: WeightFormat) -> int:
    """Bytes a (N, K) weight takes in `fmt` as parallel/compact.py holds it (= QuantLinear.nbytes):
    int4 pads its rows to INT4_ROWS and keeps a scale and zero per group in the activation dtype; int8
    a scale per row (bf16 for int8pack; fbgemm's packed weight adds a scale and column offset per row)."""
    if fmt.name in ("bf16", "fp16"):
        return 2 * n * k
    if fmt.name == "int8":
        return n * k + 2 * n if fmt.act == "bf16" else n * (k + 8)
    if fmt.name == "int4":
        npad = -(-n // INT4_ROWS) * INT4_ROWS
        return npad * k // 2 + 2 * npad * (k // fmt.group) * fmt.act_dtype.itemsize
    return 4 * n * k


def linear_wire_bytes(n: int, k: int, fmt: WeightFormat) -> int:
    """Bytes a (N, K) weight travels in when a shard is pushed in `fmt` (parallel/compact_wire.wire_parts):
    int4 codes two to a byte with a scale and zero per group in the activation dtype, int8 codes with a
    float32 scale per row, bf16 / fp16 values."""
    if fmt.name in ("bf16", "fp16"):
        return 2 * n * k
    if fmt.name == "int8":
        return n * k + 4 * n
    if fmt.name == "int4":
        return n * k // 2 + 2 * n * (k // fmt.group) * fmt.act_dtype.itemsize
    return 4 * n * k


def table_held_bytes(n: int, k: int, fmt: WeightFormat) -> int:
    """Bytes a (N, K) embedding table takes in `fmt` (QuantLinear.from_float with keep_rows, as
    parallel/compact.compact_vocab builds it): the kernel's bytes, and beside an opaque kernel's packed
    weight (bf16, fp16, int8 with int8 activations) the plain rows it keeps for lookups."""
    held = linear_held_bytes(n, k, fmt)
    if fmt.name in ("bf16", "fp16"):
        return held + 2 * n * k
    if fmt.name == "int8" and fmt.act == "int8":
        return held + n * k + 4 * n  # int8 codes and a float32 scale per row
    return held


def vocab_held(cfg: ModelConfig, spec: ShardSpec, fmt: WeightFormat) -> tuple[int, int]:
    """(parameters, bytes held) of `spec`'s embedding rows and LM head in a compact format: both in
    fmt.head_format (parallel/compact.compact_vocab), the embedding as a row table (fp16 under an int4
    head, which has no rows to give back), a tied head the table itself when their formats agree."""
    hid, v = cfg.hidden, spec.vocab[1] - spec.vocab[0]
    hf = fmt.head_format
    rows = hf.rows_format
    params = held = 0
    if spec.embed and v:
        params, held = v * hid, table_held_bytes(v, hid, rows)
    if spec.head and cfg.causal and v:
        params += 0 if cfg.tie_embeddings and spec.embed else v * hid
        held += 0 if cfg.tie_embeddings and spec.embed and rows == hf else linear_held_bytes(v, hid, hf)
    return params, held


def _linear_params(cfg: ModelConfig, spec: ShardSpec) -> int:
    return (spec.layers[1] - spec.layers[0]) * sum(n * k for n, k in shard_linears(cfg, spec))


def weight_bytes(cfg: ModelConfig, spec: ShardSpec, params: MemoryParams) -> int:
    """Bytes the device holds for `spec`'s weights: linears in params' compact format (if any), the
    embedding and LM head in its head format (`vocab_held`), every other parameter at params.weight_bytes."""
    fmt = params.compact
    if fmt is None:
        return math.ceil(shard_params(cfg, spec) * params.weight_bytes)
    layers = spec.layers[1] - spec.layers[0]
    held = layers * sum(linear_held_bytes(n, k, fmt) for n, k in shard_linears(cfg, spec))
    vocab, vocab_bytes = vocab_held(cfg, spec, fmt)
    rest = shard_params(cfg, spec) - _linear_params(cfg, spec) - vocab
    # int8 / int4: the buffer a prompt's rows put the largest linear's weight into in bf16 (compact.attach_scratch)
    scratch = (scratch_bytes(shard_linears(cfg, spec), QuantLinear.scratch_rows(fmt))
               if layers and QuantLinear.dense_capable(fmt) else 0)
    return math.ceil(rest * params.weight_bytes) + held + vocab_bytes + scratch


def push_bytes(cfg: ModelConfig, spec: ShardSpec, weights_format: str = "fp32") -> int:
    """Bytes of tensors a shard push of `spec` brings: float32, or with the linears in a compact
    format's wire form (`linear_wire_bytes`; the embedding and head still float32) -- the bound the worker
    admits the push by."""
    fmt = parse_format(weights_format)
    if fmt.name == "fp32":
        return 4 * shard_params(cfg, spec)
    layers = spec.layers[1] - spec.layers[0]
    wire = layers * sum(linear_wire_bytes(n, k, fmt) for n, k in shard_linears(cfg, spec))
    return 4 * (shard_params(cfg, spec) - _linear_params(cfg, spec)) + wire


def kv_bytes_per_position(cfg: ModelConfig, kv_heads: int, layers: int, act_bytes: int) -> int:
    """K and V of `kv_heads` heads in `layers` layers, for one position."""
    return 2 * kv_heads * cfg.head_dim * layers * act_bytes


def kv_cache_bytes(cfg: ModelConfig, kv_heads: int, layers: int, positions: int, act_bytes: int) -> int:
    return positions * kv_bytes_per_position(cfg, kv_heads, layers, act_bytes)


def spec_kv_bytes_per_position(cfg: ModelConfig, spec: ShardSpec, act_bytes: int) -> int:
    """One position of this shard's KV cache (what decode adds per token)."""
    layers = spec.layers[1] - spec.layers[0]
    return kv_bytes_per_position(cfg, kv_heads_touched(cfg, *spec.heads), layers, act_bytes)


# --- what a pass holds ----------------------------------------------------------------------------

KV_BLOCK = 16  # positions per KV block: the serving engine's default (galaxy.engine.EngineConfig.block_size)


def kv_alloc_positions(positions: int, block_size: int = KV_BLOCK) -> int:
    """Positions the paged KV blocks of a sequence of `positions` tokens cover (whole blocks)."""
    return -(-max(0, positions) // block_size) * block_size


def layer_live_elements(cfg: ModelConfig, seq: int, heads: int, kv_heads: int, cols: int, tokens: int,
                        kv_len: int | None = None) -> int:
    """Elements alive at once in the largest step of one layer on one device, from the code of a
    pass (parallel/forward.py, collectives.py, model/transformer.py):

    - the gathered Q|K|V rows, seq x (heads + 2 kv_heads) hd, twice while its tiles are joined, kept
      to the end of the layer;
    - attention of `heads` heads: rotated Q (and K), the K/V gathered to each query head over the
      kv_len positions it reads (twice), the attention output and its re-layout;
    - the MLP's inner activations over every token, twice while joined, with the tile's gate/up
      temporaries (gated) ;
    - the rows this device owns in the connective blocks (residual, norm, sums), `tokens` x hidden x 4,
      and the tiles in flight between neighbours, 2 x seq x hidden.
    """
    kv_len = seq if kv_len is None else kv_len
    hd, hid = cfg.head_dim, cfg.hidden
    qkv = (heads + 2 * kv_heads) * hd
    attention = seq * (2 * qkv + 5 * heads * hd) + 2 * kv_len * heads * hd
    mlp = seq * cols * (5 if cfg.gated_mlp else 4)
    return attention + mlp + 4 * tokens * hid + 2 * seq * hid


def layer_activation_bytes(cfg: ModelConfig, seq: int, heads: int, kv_heads: int, cols: int, tokens: int,
                           act_bytes: int, kv_len: int | None = None) -> int:
    """Resident-memory growth of one pass's activations: the live elements times HEAP_FACTOR, what
    the workers' allocator (no trimming, large buffers from the heap: transport/spawn.MALLOC_ENV)
    adds on top of the live bytes (measured, see HEAP_FACTOR)."""
    if seq <= 0:
        return 0
    live = layer_live_elements(cfg, seq, heads, kv_heads, cols, tokens, kv_len) * act_bytes
    return math.ceil(HEAP_FACTOR * live)


def output_bytes(rows: int, width: int) -> int:
    """A pass's reply: `rows` x `width` float32 values (logits of the device's vocabulary rows, or
    hidden states), held as a tensor, its bytes and the message at once (OUTPUT_COPIES, measured)."""
    return math.ceil(OUTPUT_COPIES * rows * width * 4)


def planner_activation_bytes(cfg: ModelConfig, seq: int, heads: int, cols: int, tokens: int,
                             dtype_bytes: int = 4) -> int:
    """The planner's linear estimate of a layer's activations (planner/profile.activation_bytes,
    what its cost model and solver price units by): gathered input, QKV, scores, MLP inner rows,
    partial sums and owned rows. The devices' real need (`shard_need`: the heap's growth, the KV
    cache) is larger per unit; `solver_room` shrinks each device's budget so that any split the
    solver fits within it also fits that need."""
    s, h, hd = seq, cfg.hidden, cfg.head_dim
    gathered = s * h
    qkv = s * hd * 3 * heads
    scores = heads * s * s
    inner = s * cols * (2 if cfg.gated_mlp else 1)
    partial = s * h
    own = 4 * tokens * h
    return dtype_bytes * (gathered + qkv + scores + inner + partial + own)


def _unit_need(cfg: ModelConfig, seq: int, params: MemoryParams, heads: int, cols: int, vocab: int, tokens: int,
               kv_heads: int) -> int:
    """The real need beyond weights of a shard with these unit counts over every layer: its pass and
    its KV cache at `seq` (the pieces `shard_need` adds), without the load's transient."""
    b = params.act_bytes
    act = layer_activation_bytes(cfg, seq, heads, kv_heads, cols, tokens, b)
    kv = kv_cache_bytes(cfg, kv_heads, cfg.n_layers, kv_alloc_positions(seq), b)
    return act + kv + (output_bytes(seq, vocab) if cfg.causal else output_bytes(tokens, cfg.hidden))


def _unit_weights(cfg: ModelConfig, params: MemoryParams, heads: int, cols: int, vocab: int) -> float:
    spec = ShardSpec((0, heads), (0, cols), (0, vocab), (0, cfg.n_layers))
    base = ShardSpec((0, 0), (0, 0), (0, 0), (0, cfg.n_layers))
    return (shard_params(cfg, spec) - shard_params(cfg, base)) * params.weight_bytes


def solver_room(budget: int, resident: int, cfg: ModelConfig, seq: int, params: MemoryParams,
                transient: int = PUSH_TRANSIENT) -> int:
    """The memory a device offers the planner's solver, which fits weights + the planner's linear
    activations (`planner_activation_bytes`) within it: so shrunk that every split it fits there
    also passes the worker's admission (`shard_need` within `room(budget, resident)`).

    The real need beyond the planner's estimate is bounded by a constant (a load's transient, the
    pass's per-token and fixed terms at all `seq` tokens, two KV heads a partly held group may add)
    plus a fraction rho of the shard's weights (the most any unit -- a query head with its KV cache,
    an MLP column, a vocabulary row -- needs beyond its planner estimate per byte of its weights).
    Then weights + estimate <= (room - constant) / (1 + rho) gives weights + real need <= room."""
    b = params.act_bytes

    def extra(heads: int, cols: int, vocab: int, tokens: int, kvh: int) -> int:
        """Real need beyond the planner's estimate of these units, above an empty shard's."""
        return (_unit_need(cfg, seq, params, heads, cols, vocab, tokens, kvh) - _unit_need(cfg, seq, params, 0, 0, 0,
                                                                                            0, 0)
                - planner_activation_bytes(cfg, seq, heads, cols, tokens, b)
                + planner_activation_bytes(cfg, seq, 0, 0, 0, b))

    base = _unit_need(cfg, seq, params, 0, 0, 0, 0, 0) - planner_activation_bytes(cfg, seq, 0, 0, 0, b)
    const = transient + max(0, base) + max(0, extra(0, 0, 0, seq, 0)) + 2 * max(0, extra(0, 0, 0, 0, 1))
    rho = 0.0
    if params.push_bytes > params.weight_bytes:  # received float32 beside the converted weights (load_transient_bytes)
        rho = (params.push_bytes - params.weight_bytes) / params.weight_bytes
        hid = cfg.hidden
        const += math.ceil(max(cfg.vocab_size * hid, cfg.ffn * hid * (2 if cfg.gated_mlp else 1)) * params.weight_bytes)
    per_unit = 0.0
    for heads, cols, vocab in ((cfg.group, 0, 0), (0, 1, 0), (0, 0, 1)):  # a whole KV group, a column, a row
        weights = _unit_weights(cfg, params, heads, cols, vocab)
        per_unit = max(per_unit, extra(heads, cols, vocab, 0, 1 if heads else 0) / max(1.0, weights))
    rho += per_unit
    return math.floor((room(budget, resident) - const) / (1.0 + rho))


def seqpar_activation_bytes(cfg: ModelConfig, seq: int, tokens: int, dtype_bytes: int = 4) -> int:
    """Peak activations of a sequence-parallel layer (every device holds the whole model and runs
    its own `tokens` rows): own queries, everyone's K and V, own scores and MLP rows -- the
    planner's estimate of that baseline (planner/cost.py), which the worker admits by too."""
    hid, hd, s = cfg.hidden, cfg.head_dim, tokens
    kv_all = 2 * seq * cfg.n_kv_heads * hd
    own = s * hid * 4 + s * hd * cfg.n_heads * 2
    scores = cfg.n_heads * s * seq
    inner = s * cfg.ffn * (2 if cfg.gated_mlp else 1)
    return dtype_bytes * (kv_all + own + scores + inner)


# --- a load, and whether it fits -------------------------------------------------------------------

def file_transient_bytes(cfg: ModelConfig, file_bytes: int) -> int:
    """A load that reads the checkpoint itself: one whole canonical tensor in float32 where a column
    cut is read as whole rows, then narrowed (the attention and MLP matrices, learned positions).
    The vocabulary is cut by rows, read straight into the device's own rows, so the embedding never
    exists whole. The file's pages it maps are page cache, which the kernel reclaims under a memory
    limit rather than killing the process, so they are not counted either (file_bytes stays in the
    signature for callers that size the load by the file)."""
    hid, hd = cfg.hidden, cfg.head_dim
    largest = max(cfg.ffn * hid, cfg.n_heads * hd * hid,
                  (cfg.max_positions + cfg.position_offset) * hid if cfg.position == "learned" else 0)
    return 4 * largest


# Bytes per element of one (N, K) weight that putting it in a compact format holds beside the float32
# weight (model/quant.py, parallel/compact_wire.py), its result included. Measured: peak resident growth
# (VmHWM) of converting one 3072 x 2048 weight beyond its input, one thread: from float32, int4 12.8 B per
# element (0.6 of it the result: the quantizer's float32 quotient, its rounding, the int32 codes), int8 12.0,
# fp16 8.0, bf16 4.0; from pushed parts, fp16 12.0, bf16 8.0, int4 6.4 (the unpacked int32 codes), int8 0.
# Counted for the largest whole matrix (int8 quantizes a whole row-parallel weight before cutting it).
QUANTIZE_TEMP_BYTES = 13


def quantize_transient_bytes(cfg: ModelConfig, fmt: WeightFormat) -> int:
    """The temporaries of converting one linear into `fmt`, for the largest whole matrix of the model."""
    if fmt.name == "fp32":
        return 0
    hid = cfg.hidden
    largest = max((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * hid, cfg.n_heads * cfg.head_dim * hid,
                  cfg.ffn * hid)
    return QUANTIZE_TEMP_BYTES * largest


# What building a shard's compiled decode halves (parallel/decode_graph.py, inductor) adds at its peak, beside
# the loaded shard: the process's own growth, which stays (inductor's modules, the compiled code), and its
# descendants' (gone after). The build compiles with one thread (decode_graph._one_compile_thread), so the
# figure is one on every host; counted per compile worker of inductor's pool (one per core, up to 32) it came to
# ~1.9 GiB on a 6-core Jetson and ~9 GiB on a 32-core host, and budgeted workers refused the build. Measured on
# SmolLM2 on one device with one compile thread, int4 and fp32, a cold and a warm inductor cache
# (docs/decode-formats.md "The one-token step's compiled halves"): the process grew by at most 146 MiB (fp32),
# its descendants (g++ and its cc1plus on a cold cache, a Python helper on a warm one) held at most 263 MiB at
# once (PSS): the largest of each, rounded up.
DECODE_COMPILE_BYTES = (160 + 272) * MiB


def decode_compile_bytes() -> int:
    """Peak bytes a decode-graph build adds beside the loaded shard (one compile thread, on any host)."""
    return DECODE_COMPILE_BYTES


@dataclass(frozen=True)
class ShardNeed:
    """Bytes a device needs beside its resident process to load a shard and run a pass over it."""

    weights: int
    transient: int  # while loading
    kv: int  # KV cache of the reserved positions
    activations: int  # one pass at the reserved length
    reply: int = 0  # that pass's reply with every token's row (`galaxy run --seq-len N --check`)
    compile: int = 0  # building the decode graphs after the load (decode_compile_bytes; part of it stays)

    @property
    def total(self) -> int:
        """The load (transient, then the KV it reserves) and a one-shot pass returning every row (no
        KV pool is allocated for it, the load's transient is gone) never overlap: the larger counts. A
        decode-graph build follows the load (its transient gone) and part of it stays beside the KV."""
        return self.weights + self.activations + max(self.transient + self.kv, self.reply, self.compile + self.kv)

    def describe(self) -> str:
        """`total` in words: the sum it counts, with the one of the load's transient, the decode-graph build
        and the reply that `total` takes (the larger; they never overlap) named and the others not added."""
        parts = [f"{self.weights / MiB:.0f} MiB of weights"] if self.weights else []
        if self.compile > self.transient:
            build = f"{self.compile / MiB:.0f} MiB compiling the decode step"
            parts.append(build + (f" (after the load's {self.transient / MiB:.0f} MiB)" if self.transient else ""))
        elif self.transient:
            build = f" (the decode step's build after it, {self.compile / MiB:.0f} MiB)" if self.compile else ""
            parts.append(f"{self.transient / MiB:.0f} MiB while loading{build}")
        if self.kv:
            parts.append(f"{self.kv / MiB:.0f} MiB of KV cache")
        if self.activations:
            parts.append(f"{self.activations / MiB:.0f} MiB of activations")
        out = " + ".join(parts)
        if self.reply > max(self.transient, self.compile) + self.kv:
            out += f", or {self.reply / MiB:.0f} MiB for a reply of every token's row in place of the load's part"
        return out


def shard_need(cfg: ModelConfig, spec: ShardSpec, params: MemoryParams, seq: int, tokens: int,
               transient: int = PUSH_TRANSIENT, seqpar: bool = False) -> ShardNeed:
    """What loading `spec` and running a `seq`-token pass on it needs, that pass returning every
    token's row -- what `galaxy run --seq-len N --check` does after its load (tokens: the rows this
    device owns in the connective blocks; seqpar: the sequence-parallel baseline, no KV cache)."""
    layers = spec.layers[1] - spec.layers[0]
    heads, cols = spec.heads[1] - spec.heads[0], spec.cols[1] - spec.cols[0]
    kvh = kv_heads_touched(cfg, *spec.heads)
    if seqpar:
        act = seqpar_activation_bytes(cfg, seq, tokens, params.act_bytes)
        kv = 0
    else:
        act = layer_activation_bytes(cfg, seq, heads, kvh, cols, tokens, params.act_bytes) if layers else 0
        kv = kv_cache_bytes(cfg, kvh, layers, kv_alloc_positions(seq), params.act_bytes)
    if cfg.causal:  # as pass_need counts it: the held vocabulary rows' logits of every token
        reply = output_bytes(tokens if seqpar else seq, spec.vocab[1] - spec.vocab[0]) if spec.head else 0
    else:
        reply = output_bytes(tokens, cfg.hidden)
    return ShardNeed(weight_bytes(cfg, spec, params), transient, kv, act, reply)


def room(budget: int, resident: int) -> int:
    """What a memory budget leaves for a shard beside the resident process and a pass's fixed
    costs (RUN_SLACK); negative when nothing fits. budget 0 means no cap (callers check first)."""
    return budget - resident - RUN_SLACK


def planner_room(budget: int, resident: int, transient: int = PUSH_TRANSIENT) -> int:
    """The per-device budget the planner fits weights + `activation_bytes` into: `room` with the
    load's transient taken off -- so the solver's check is the worker's `shard_need` sum."""
    return room(budget, resident) - transient


def check_fits(device: str, need: ShardNeed, budget: int, resident: int, what: str = "loading its shard") -> None:
    """Raise DeviceOutOfMemory naming the device, the need and the budget, unless it fits (or no budget)."""
    if not budget or need.total <= room(budget, resident):
        return
    raise DeviceOutOfMemory(
        f"{device}: {what} needs {need.total / MiB:.0f} MiB ({need.describe()}) beside the "
        f"{resident / MiB:.0f} MiB the worker holds, and its memory budget is {budget / MiB:.0f} MiB "
        f"({RUN_SLACK / MiB:.0f} MiB kept for a pass's buffers): give it a smaller share (`galaxy plan`), "
        "add a device, use a smaller model or dtype, or reserve fewer tokens (--seq-len)")


def load_transient_bytes(cfg: ModelConfig, spec: ShardSpec, params: MemoryParams, file_bytes: int | None = None,
                         arrived: bool = False, compact_push: bool = False) -> int:
    """What a load holds beside its finished weights. Pushed (file_bytes None): gRPC's buffers
    (PUSH_TRANSIENT), or nothing more once the shard has arrived (it is in the resident memory
    then, with what the push left); read from a checkpoint of file_bytes: its mapped pages and one
    whole tensor. When the device holds weights smaller than they arrive (bf16 from float32), also
    the received copy until it is converted, tensor by tensor (sharding.build_shard), and one
    converted tensor. A compact weights format converts its linears after the float32 shard is built
    (parallel/compact.compact_shard), so until then the shard's linears are held in float32 beside
    what they become, plus one conversion's temporaries (`quantize_transient_bytes`); a shard pushed
    already compact (`compact_push`) only adds the temporaries of one linear built from its parts. Either
    way the embedding and head arrive in float32 and stay so until the finished shard puts them in the
    head format (compact.compact_vocab), beside what they become."""
    if file_bytes is not None:
        out = file_transient_bytes(cfg, file_bytes)
    else:
        out = 0 if arrived else PUSH_TRANSIENT
    fmt = params.compact
    if fmt is not None:
        out += quantize_transient_bytes(cfg, fmt)
        if not compact_push:
            layers = spec.layers[1] - spec.layers[0]
            out += layers * sum(4 * n * k - linear_held_bytes(n, k, fmt) for n, k in shard_linears(cfg, spec))
        out += 4 * vocab_held(cfg, spec, fmt)[0]
    n = shard_params(cfg, spec)
    if params.push_bytes > params.weight_bytes:
        hid = cfg.hidden
        largest = max(cfg.vocab_size * hid, cfg.ffn * hid * (2 if cfg.gated_mlp else 1))
        out += math.ceil(n * (params.push_bytes - params.weight_bytes) + largest * params.weight_bytes)
    return out


# --- one pass --------------------------------------------------------------------------------------

def pass_need(cfg: ModelConfig, partition: Partition, rank: int, act_bytes: int, seq: int, context: int,
              rows: int | None) -> int:
    """Bytes one pass needs on `rank` beside what the device holds: its activations (`seq` tokens,
    attention reading `context` positions of one sequence at a time, as the paged kernel gathers
    them) and its reply (`rows` logit rows; None: every token's row). The KV it writes is in the
    pool, allocated already. The worker checks every pass with this before it computes."""
    spec = partition.spec(rank, cfg)
    layers = spec.layers[1] - spec.layers[0]
    heads, cols = spec.heads[1] - spec.heads[0], spec.cols[1] - spec.cols[0]
    strategy = partition.strategy
    split = strategy == Strategy.SEQPAR or (strategy == Strategy.GALAXY and not decodes_tensor_parallel(partition, seq))
    tokens = partition.tokens(seq)[rank] if split else seq
    kvh = kv_heads_touched(cfg, *spec.heads)
    if strategy == Strategy.SEQPAR:
        act = seqpar_activation_bytes(cfg, context, tokens, act_bytes)
    else:
        act = layer_activation_bytes(cfg, seq, heads, kvh, cols, tokens, act_bytes, context) if layers else 0
    if cfg.causal:
        width = (cfg.vocab_size if strategy in (Strategy.PIPELINE, Strategy.SEQPAR) else spec.vocab[1] - spec.vocab[0])
        width = width if spec.head else 0
        rows = rows if rows is not None else (tokens if strategy == Strategy.SEQPAR else seq)
    else:
        width, rows = cfg.hidden, tokens if split else seq
    return act + output_bytes(rows, width)


def request_need(cfg: ModelConfig, partition: Partition, rank: int, act_bytes: int, req: Request) -> int:
    """`pass_need` of one Request (a sequence with no KV cache: its tokens read each other)."""
    seq = int(req.ids.shape[0])
    return pass_need(cfg, partition, rank, act_bytes, seq, req.start_pos + seq, 1 if req.last_only else None)


RESERVED_ROWS = 32  # logit rows a reserved pass returns: an engine step samples one per running sequence
# (galaxy.engine.EngineConfig.max_running, 32 by default); a longer reply is checked when asked for


def pass_reserve(cfg: ModelConfig, partition: Partition, rank: int, act_bytes: int, seq: int) -> int:
    """What a device keeps beside its KV pool for the passes it runs: a `seq`-token step (the
    largest the load reserved memory for, LoadOptions.seq_len) with RESERVED_ROWS logit rows, its
    attention reading up to the model's whole context -- an engine step gathers one sequence's
    K/V at a time out of the pool, which may hold far more positions than `seq`."""
    return pass_need(cfg, partition, rank, act_bytes, seq, max(seq, cfg.max_positions), min(seq, RESERVED_ROWS))


def kv_pool_budget(budget: int, resident: int, reserve: int) -> int:
    """The serving engine's KV pool on a device: what its memory budget leaves beside the loaded
    process (`resident`), a pass (`reserve`, `pass_reserve`), RUN_SLACK and RESIDENT_DRIFT; 0 when
    nothing is left. Only for a device with a budget (0: the caller picks its own cap)."""
    return max(0, room(budget, resident) - reserve - RESIDENT_DRIFT)


def stash_room(free: int, reserve: int, pool: int) -> int:
    """Bytes a device may give the device-local K/V pool (parallel/kv_stash.py) beside its plan: `free` -- what
    its memory budget leaves beside the loaded process (`room`), or, with no budget, the memory available now --
    less a pass of the reserved length (`reserve`, pass_reserve), the engine's KV pool on this device (`pool`,
    counted whole whether or not its pages are written yet) and RESIDENT_DRIFT. Negative: nothing to give."""
    return free - reserve - pool - RESIDENT_DRIFT


def check_request(device: str, need: int, budget: int, resident: int) -> None:
    """Raise DeviceOutOfMemory unless a request's `need` fits the budget beside `resident`."""
    if budget and need > room(budget, resident):
        raise DeviceOutOfMemory(
            f"{device}: memory budget reached: this request needs {need / MiB:.0f} MiB (activations and reply) "
            f"beside the {resident / MiB:.0f} MiB the worker holds, and its memory budget is "
            f"{budget / MiB:.0f} MiB; send fewer tokens at once (a smaller max_batched_tokens or prefill chunk)")
