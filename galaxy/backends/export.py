"""ONNX graphs of a block's steps, exported once per *shape class* and cached on disk.

Weights are graph **inputs**, not baked initializers: onnxruntime reads them straight from the
torch parameters on every call (zero-copy, CPU). So a cached graph holds no weights at all
(a few KB), identical layers, ranks and same-architecture models share one graph and one
session, and no cache key ever needs a hash of weight values. The price, measured on this
machine, is that ORT cannot pre-pack constant GEMM weights: ~5% slower on large GEMMs than
baked initializers -- but baking (or handing ORT initializers) made ORT keep its own copy of
every weight, doubling a shard's weight memory, which edge devices cannot afford.

Every step but `attend` is shape-generic (its weight and width axes are dynamic too), so its
key is the step plus the config fields that reach layer graphs. `attend` bakes its head layout
(query heads, KV heads, the GQA map) and is keyed by that as well.

A block's missing graphs are exported in one exporter call and then cut apart: the exporter
rebuilds its op registry on every call, which made one call per step ~5x slower.

The math is model/transformer.py's own: each step graph traces the block's method through
`torch.func.functional_call` with the parameters swapped for graph inputs. Only attention is
re-expressed here, because transformer.py's takes the start position as a Python int (and branches
on it) while the graph must take it as a tensor.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import transformer as model_py
from ..model.config import ModelConfig
from ..model.transformer import Attention, Block, rope

log = logging.getLogger(__name__)

OPSET = 18

# Config fields each owner's code in model/transformer.py reads (attention, MLP, the block and its norms),
# sizes aside; with a step's parameters and, for attend, the shard's head layout they fix its
# graph. Keys hold nothing else, so same-architecture models share graphs. tests/backends checks
# this table against model/transformer.py, so a new field read there cannot be left out of the keys.
FIELDS = {
    "attn": ("causal", "position", "rope_theta", "attn_bias", "out_bias"),
    "mlp": ("activation", "gated_mlp", "mlp_bias"),
    "": ("pre_norm", "norm", "norm_eps"),
}
# Sizes: the shape-generic steps take them from their inputs' dynamic axes; attend's key has them.
SHAPE_FIELDS = ("hidden", "n_heads", "n_kv_heads", "head_dim", "ffn")


@dataclass(frozen=True)
class Step:
    """One block method run as one graph: where it lives, its tensor arguments and parameters,
    each with its axes named (t tile rows, h hidden, o QKV width, k context width, c columns)."""

    name: str  # "attn.project", ...: the attribute path from the Block
    args: tuple[tuple[str, str], ...]  # (input name, axes)
    params: tuple[tuple[str, str], ...]  # (parameter of the owner, axes); absent ones are skipped

    @property
    def owner(self) -> str:
        return self.name.rpartition(".")[0]  # "attn", "mlp" or "" (the Block)

    @property
    def method(self) -> str:
        return self.name.rpartition(".")[2]


def _step(name: str, args: str, params: str) -> Step:
    """Step from "x:th s:th" / "norm1.weight:h ..." strings."""
    pairs = lambda text: tuple(tuple(item.split(":")) for item in text.split())
    return Step(name, pairs(args), pairs(params))


STEPS = {s.name: s for s in (
    _step("attn.project", "x:th", "qkv.weight:oh qkv.bias:o"),
    _step("attn.project_out", "ctx:tk", "out.weight:hk"),
    _step("mlp.expand", "x:th", "up.weight:ch up.bias:c gate.weight:ch gate.bias:c"),
    _step("mlp.contract", "a:tc", "down.weight:hc"),
    _step("attn_input", "x:th", "norm1.weight:h norm1.bias:h"),
    _step("after_attn", "x:th s:th", "attn.out_bias:h norm1.weight:h norm1.bias:h"),
    _step("mlp_input", "x:th", "norm2.weight:h norm2.bias:h"),
    _step("after_mlp", "x:th s:th", "mlp.down_bias:h norm2.weight:h norm2.bias:h"),
)}
# Example sizes of the named axes: distinct, and never 0 or 1 (which torch.export specialises),
# so the traced graph cannot confuse two axes that happen to be equal in some model.
EXAMPLE_SIZES = {"t": 5, "h": 12, "o": 18, "k": 8, "c": 14, "s": 6, "p": 3}  # s, p: attend's rows, past
ATTEND = "attn.attend"
ATTEND_INPUTS = ("qkv", "start", "past_k", "past_v")
ATTEND_OUTPUTS = ("ctx", "k", "v")


class GraphError(RuntimeError):
    """An exported graph that would not be correct to cache or share; names the step."""


def owner_of(blk: Block, step: Step) -> nn.Module:
    return blk.get_submodule(step.owner) if step.owner else blk


def present_params(blk: Block, step: Step) -> list[str]:
    """The step's parameters this block has (biases and gates depend on the architecture)."""
    names = dict(owner_of(blk, step).named_parameters())
    return [p for p, _ in step.params if p in names]


@functools.cache
def _versions() -> dict:
    """What else shapes an exported graph: the code it traces (model/transformer.py, this file: an edit there
    re-exports rather than reuse a stale graph) and the exporter (versions read from package
    metadata: importing the exporter would cost a warm start most of its time)."""
    code = hashlib.sha256(Path(model_py.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]
    return {"torch": torch.__version__, "onnxscript": version("onnxscript"), "opset": OPSET, "code": code}


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def graph_key(cfg: ModelConfig, blk: Block, name: str) -> str:
    """Cache key of one step's graph: step, config fields, parameters present, exporter versions."""
    if name == ATTEND:
        a = blk.attn
        shape = {"nq": a.nq, "nkv": a.nkv, "kv_map": a.kv_map, "head_dim": cfg.head_dim}
        fields = FIELDS["attn"]
    else:
        step = STEPS[name]
        shape = {"params": present_params(blk, step)}
        fields = FIELDS[step.owner]
    return _key({"step": name, "config": {f: getattr(cfg, f) for f in fields}, **shape, **_versions()})


# -- the graphs ---------------------------------------------------------------------------------
class _Method(nn.Module):
    """Calls `target`'s class method (never an instance override such as a bound session)."""

    def __init__(self, target: nn.Module, method: str):
        super().__init__()
        self.target, self.method = target, method

    def forward(self, *args):
        return getattr(type(self.target), self.method)(self.target, *args)


class StepGraph(nn.Module):
    """forward(*args, *params) = owner.method(*args) with the owner's parameters replaced by inputs."""

    def __init__(self, owner: nn.Module, method: str, n_args: int, params: list[str]):
        super().__init__()
        # not a registered submodule: the real weights must not become graph initializers
        object.__setattr__(self, "call", _Method(owner, method))
        self.n_args, self.params = n_args, params

    def forward(self, *inputs):
        args, weights = inputs[: self.n_args], inputs[self.n_args :]
        swap = {f"target.{p}": w for p, w in zip(self.params, weights)}
        return torch.func.functional_call(self.call, swap, args)


class AttendGraph(nn.Module):
    """Attention of one shard's heads, start position and past K/V as tensors (KV cache decode).

    (qkv (S, (nq+2nkv) hd), start (), past_k/past_v (nkv, P, hd)) ->
    ctx (S, nq hd), k and v (nkv, S, hd) of the new positions, RoPE applied, for the cache.
    Same math as Attention.split_heads / attend_heads / model.attention_core; P may be 0.
    """

    def __init__(self, attn: Attention):
        super().__init__()
        cfg = attn.cfg
        self.nq, self.nkv, self.hd = attn.nq, attn.nkv, cfg.head_dim
        self.causal, self.theta = cfg.causal, cfg.rope_theta
        self.rope = cfg.position == "rope"
        self.kv_map = attn.kv_map

    def forward(self, qkv, start, past_k, past_v):
        s, hd = qkv.shape[0], self.hd
        q, k, v = qkv.split([self.nq * hd, self.nkv * hd, self.nkv * hd], dim=-1)
        q = q.reshape(s, self.nq, hd).transpose(0, 1)  # (nq, S, hd)
        k = k.reshape(s, self.nkv, hd).transpose(0, 1)  # (nkv, S, hd)
        v = v.reshape(s, self.nkv, hd).transpose(0, 1)
        qpos = start + torch.arange(s)  # (S,) absolute positions of the queries
        if self.rope:
            q, k = rope(q, qpos, self.theta), rope(k, qpos, self.theta)
        k_all, v_all = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)  # (nkv, P+S, hd)
        if self.kv_map is not None:
            idx = torch.tensor(self.kv_map, dtype=torch.long)
            k_all, v_all = k_all.index_select(0, idx), v_all.index_select(0, idx)
        mask = torch.arange(k_all.shape[1])[None, :] <= qpos[:, None] if self.causal else None  # (S, P+S)
        ctx = F.scaled_dot_product_attention(q[None], k_all[None], v_all[None], attn_mask=mask)[0]
        return ctx.transpose(0, 1).reshape(s, self.nq * hd), k, v


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs every missing optional package and warns about itself on each call."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class _Batch(nn.Module):
    """Several step graphs side by side, so that one exporter call produces all of them."""

    def __init__(self, graphs: list[nn.Module], arity: list[int]):
        super().__init__()
        self.graphs, self.arity = nn.ModuleList(graphs), arity

    def forward(self, *inputs):
        outs, i = [], 0
        for graph, n in zip(self.graphs, self.arity):
            y = graph(*inputs[i : i + n])
            outs += list(y) if isinstance(y, tuple) else [y]
            i += n
        return tuple(outs)


@dataclass
class _Spec:
    """One step's part of a batched export: its graph, inputs, example tensors, dynamic axes, outputs."""

    graph: nn.Module
    inputs: list[str]
    example: list[torch.Tensor]
    dynamic: list
    outputs: list[str]


def _dims(item: int) -> dict:
    """Dynamic axes of one graph of a batch. Each graph gets its own: shared ones would let the
    exporter read a size off another graph's input, and the graphs could not be cut apart."""
    return {ax: torch.export.Dim(f"{ax}_{item}", min=0 if ax == "p" else 1) for ax in EXAMPLE_SIZES}


def _step_spec(blk: Block, name: str, dims: dict) -> _Spec:
    if name == ATTEND:
        a, hd, n = blk.attn, blk.attn.cfg.head_dim, EXAMPLE_SIZES
        example = [torch.randn(n["s"], a.qkv.weight.shape[0]), torch.tensor(7),
                   torch.randn(a.nkv, n["p"], hd), torch.randn(a.nkv, n["p"], hd)]
        dynamic = [{0: dims["s"]}, None, {1: dims["p"]}, {1: dims["p"]}]
        return _Spec(AttendGraph(a), [f"{name}/{i}" for i in ATTEND_INPUTS], example, dynamic,
                     [f"{name}/{o}" for o in ATTEND_OUTPUTS])
    step = STEPS[name]
    params = present_params(blk, step)
    axes = dict(step.args) | dict(step.params)
    local = [a for a, _ in step.args] + params
    example = [torch.randn([EXAMPLE_SIZES[ax] for ax in axes[n]]) for n in local]
    dynamic = [{i: dims[ax] for i, ax in enumerate(axes[n])} for n in local]
    graph = StepGraph(owner_of(blk, step), step.method, len(step.args), params)
    return _Spec(graph, [f"{name}/{n}" for n in local], example, dynamic, [f"{name}/y"])


def input_names(blk: Block, name: str) -> list[str]:
    """Graph input names of a step, in call order: its args, then (for steps) its parameters."""
    if name == ATTEND:
        return [f"{name}/{i}" for i in ATTEND_INPUTS]
    step = STEPS[name]
    return [f"{name}/{n}" for n in [a for a, _ in step.args] + present_params(blk, step)]


def _strip_prefix(proto, prefix: str) -> None:
    """Rename a cut-out graph's inputs and outputs back from the batch's unique names."""
    rename = {v.name: v.name[len(prefix):] for v in (*proto.graph.input, *proto.graph.output)}
    for v in (*proto.graph.input, *proto.graph.output):
        v.name = rename[v.name]
    for node in proto.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]


def export_steps(items: list[tuple[Block, str]]) -> list:
    """ONNX models of (block, step name) pairs -- "attn.attend" or a STEPS name -- in one export."""
    from onnx.utils import Extractor

    with torch.inference_mode(False):
        specs = [_step_spec(blk, name, _dims(i)) for i, (blk, name) in enumerate(items)]
        prefixes = [f"b{i}:" for i in range(len(items))]  # the same step of two shards: unique names
        batch = _Batch([s.graph for s in specs], [len(s.inputs) for s in specs])
        example = tuple(t for s in specs for t in s.example)
        dynamic = (tuple(d for s in specs for d in s.dynamic),)
        inputs = [p + i for p, s in zip(prefixes, specs) for i in s.inputs]
        outputs = [p + o for p, s in zip(prefixes, specs) for o in s.outputs]
        with _quiet_exporter():
            program = torch.onnx.export(batch, example, dynamo=True, dynamic_shapes=dynamic, input_names=inputs,
                                        output_names=outputs, opset_version=OPSET, verbose=False)
    cut = Extractor(program.model_proto)
    out = []
    for (_, name), prefix, spec in zip(items, prefixes, specs):
        proto = cut.extract_model([prefix + i for i in spec.inputs], [prefix + o for o in spec.outputs])
        foreign = {i for n in proto.graph.node for i in n.input if ":" in i and not i.startswith(prefix)}
        if foreign:
            raise GraphError(f"the {name} graph reads other graphs' inputs {sorted(foreign)}")
        _strip_prefix(proto, prefix)
        _check_weight_free(proto, name)
        if name != ATTEND:
            _check_generic(proto, name)
        out.append(proto)
    return out


def _check_weight_free(proto, name: str, max_bytes: int = 1 << 16) -> None:
    big = [(i.name, list(i.dims)) for i in proto.graph.initializer if len(i.raw_data) > max_bytes]
    if big:
        raise GraphError(f"the {name} graph captured weights as constants {big}: they must be graph inputs")


def _check_generic(proto, name: str) -> None:
    """Every axis of a shape-generic graph's inputs must be symbolic, or sharing it would fail."""
    for inp in proto.graph.input:
        fixed = [d.dim_value for d in inp.type.tensor_type.shape.dim if not d.dim_param]
        if fixed:
            raise GraphError(f"the {name} graph fixed input {inp.name!r} to sizes {fixed}; it cannot be "
                             f"shared between shards")


def is_identity(proto) -> bool:
    """A step that computes nothing (post-norm layers' attn_input / mlp_input): keep it in torch."""
    return all(n.op_type == "Identity" for n in proto.graph.node)


class GraphCache:
    """Exported graphs in `root`, one file per key: `{step}-{key}.onnx` (`.identity` for no-ops)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.exported = 0  # graphs exported by this object (cache misses)
        self.reused = 0  # graphs found on disk
        self.export_calls = 0
        self.export_seconds = 0.0

    def _path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}.onnx"

    def _find(self, name: str, key: str) -> Path | None | bool:
        """The graph's path, None for a no-op step, False when it is not cached."""
        path = self._path(name, key)
        if path.exists():
            return path
        return None if path.with_suffix(".identity").exists() else False

    def prefetch(self, items: list[tuple[Block, list[str]]]) -> None:
        """Export, in one exporter call, every graph the (block, step names) pairs need and the
        cache lacks (each key once)."""
        if not self._missing(items):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".export.lock", "a") as lock:
            # Workers sharing this directory (`--local N` on one machine) wait for the one exporting and
            # then find its graphs: three workers of an even split once ran the same export at once,
            # three times the CPU on the same cores. Advisory and per open file: threads serialize too.
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._export(self._missing(items))

    def _missing(self, items: list[tuple[Block, list[str]]]) -> dict[tuple[str, str], Block]:
        """(step, key) -> a block, for each graph the pairs need and the cache lacks (each key once)."""
        missing: dict[tuple[str, str], Block] = {}
        for blk, names in items:
            for n in names:
                key = graph_key(blk.attn.cfg, blk, n)
                if (n, key) not in missing and self._find(n, key) is False:
                    missing[(n, key)] = blk
        return missing

    def _export(self, missing: dict[tuple[str, str], Block]) -> None:
        if not missing:
            return
        t0 = time.perf_counter()
        protos = export_steps([(blk, n) for (n, _), blk in missing.items()])
        for ((name, key), _), proto in zip(missing.items(), protos):
            path = self._path(name, key)
            target = path.with_suffix(".identity") if is_identity(proto) else path
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(proto.SerializeToString())
            os.replace(tmp, target)  # atomic: devices sharing a cache directory never read half a file
        self.exported += len(missing)
        self.export_calls += 1
        self.export_seconds += time.perf_counter() - t0
        log.info("exported %d ONNX graphs in %.1f s", len(missing), time.perf_counter() - t0)

    def paths(self, blk: Block, names: list[str]) -> dict[str, Path | None]:
        """Graph file of each named step of `blk` (None: a no-op step), exporting the missing ones."""
        before = self.exported
        self.prefetch([(blk, names)])
        self.reused += len(names) - (self.exported - before)
        return {n: self._find(n, graph_key(blk.attn.cfg, blk, n)) for n in names}
