"""Run a shard's block steps with ONNX Runtime (CPU provider) instead of torch.

`apply_onnx(model, cache_dir, threads)` replaces, on every block of one device's shard, the step
methods the parallel forwards call between collectives -- attn.project / attend / project_out,
mlp.expand / contract and the four connective steps -- by callables that run one ONNX Runtime
session each: torch tensors in, torch tensors out, one session call per call of the method, so
tiles stay separate calls and the overlap in collectives.py is unchanged. Collectives, the
embedding, the final norm and the LM head stay in torch.

Kept in torch: steps of an empty shard (zero heads or columns), calls on zero rows, and steps
that compute nothing (post-norm layers' attn_input / mlp_input). Generation's steps attend over
the paged KV cache in torch (Attention.attend_paged, which is not replaced): the graph would need
the cached K and V copied into it on every step, and measured 1.2-1.4x slower than torch for
one-token decodes, which reads them in place.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import GalaxyError
from ..model.transformer import Block, Transformer
from ..paths import cache_dir
from .export import ATTEND, STEPS, GraphCache, input_names, owner_of, present_params


def default_cache_dir() -> Path:
    """Where exported graphs are kept between starts: galaxy.paths' onnx/ (~/.cache/galaxy/onnx)."""
    return cache_dir("onnx")


PARTS = {  # what the profiler times separately
    "attention": ("attn.project", ATTEND, "attn.project_out"),
    "mlp": ("mlp.expand", "mlp.contract"),
    "connective": ("attn_input", "after_attn", "mlp_input", "after_mlp"),
}




class BackendError(GalaxyError, ValueError):
    """A model the ONNX backend cannot run; the message says what to change."""


def session_options(threads: int):
    """intra-op threads = the device's threads, inter-op 1 (steps are sequential graphs), and no
    spinning: between session calls a device waits on collectives, and spinning pool threads would
    take CPU from the devices it shares cores with."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only
    return so


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class OnnxStep:
    """A block method run by an ONNX Runtime session: fn(*args) with the block's weights added."""

    def __init__(self, name: str, session, arg_names: list[str], weights: dict[str, np.ndarray], fallback):
        self.name, self.session, self.arg_names = name, session, arg_names
        self.weights = weights  # numpy views of the torch parameters: ORT reads them in place
        self.fallback = fallback  # the torch method, for calls on zero rows

    def __call__(self, *args):
        if args[0].shape[0] == 0:
            return self.fallback(*args)
        feed = dict(self.weights)
        feed.update((n, _np(a)) for n, a in zip(self.arg_names, args))
        (y,) = self.session.run(None, feed)
        return torch.from_numpy(y)

    def __repr__(self) -> str:
        return f"OnnxStep({self.name})"


class OnnxAttend:
    """Attention.attend(qkv, start_pos, rot) of a whole prompt run by an ONNX Runtime session (the graph
    takes past K/V as inputs too; a pass without a cache gives it none)."""

    def __init__(self, session, inputs: list[str], nkv: int, hd: int, fallback):
        self.session, self.inputs, self.fallback = session, inputs, fallback
        self.no_past = np.zeros((nkv, 0, hd), dtype=np.float32)

    def __call__(self, qkv: torch.Tensor, start_pos: int = 0, rot=None) -> torch.Tensor:
        """rot: the pass's RoPE table (forward computes it once per pass for torch's attention); the
        graph rotates by start_pos itself, so only the torch fallback takes it."""
        if qkv.shape[0] == 0:
            return self.fallback(qkv, start_pos, rot)
        feed = dict(zip(self.inputs, (_np(qkv), np.array(start_pos, dtype=np.int64), self.no_past, self.no_past)))
        ctx, _, _ = self.session.run(None, feed)
        return torch.from_numpy(ctx)

    def __repr__(self) -> str:
        return f"OnnxAttend(nkv={self.no_past.shape[0]})"


@dataclass
class OnnxSummary:
    """What apply_onnx did, for the worker's log and for start-time measurements."""

    steps: int = 0  # methods now backed by ONNX Runtime
    torch_steps: int = 0  # methods kept in torch (empty shard pieces, no-op steps)
    exported: int = 0  # graphs exported (cache misses)
    reused: int = 0  # graphs found in the cache
    export_seconds: float = 0.0  # of `seconds`, spent exporting
    sessions: int = 0  # ONNX Runtime sessions created (shared by blocks of the same shape)
    seconds: float = 0.0  # all of apply_onnx: cache look-ups, exports, session creation


class _Sessions:
    """Graphs from the disk cache and one session per graph file, shared by the blocks of a shard."""

    def __init__(self, cache_dir: Path, threads: int):
        self.graphs = GraphCache(cache_dir)
        self.threads = threads
        self.by_path: dict[Path, object] = {}

    def session(self, path: Path):
        if path not in self.by_path:
            import onnxruntime as ort

            self.by_path[path] = ort.InferenceSession(str(path), session_options(self.threads),
                                                      providers=["CPUExecutionProvider"])
        return self.by_path[path]


def _bind(obj, name: str, fn) -> None:
    """Shadow the class method `name` on this instance (nn.Module stores plain attributes as-is)."""
    obj.__dict__[name] = fn


def _torch_method(obj, name: str):
    return functools.partial(getattr(type(obj), name), obj)


def _empty(blk: Block, name: str) -> bool:
    """A step of a shard with no heads or no columns: torch already returns the empty / zero result."""
    owner = name.partition(".")[0]
    return (owner == "attn" and blk.attn.nq == 0) or (owner == "mlp" and blk.mlp.up.out_features == 0)


def _wanted(blk: Block, steps: list[str]) -> list[str]:
    return [n for n in steps if not _empty(blk, n)]


def _bind_block(blk: Block, sessions: _Sessions, steps: list[str], summary: OnnxSummary) -> None:
    wanted = _wanted(blk, steps)
    summary.torch_steps += len(steps) - len(wanted)
    for name, path in sessions.graphs.paths(blk, wanted).items():
        if path is None:  # a no-op step: a session call would only cost time
            summary.torch_steps += 1
            continue
        owner_name, _, method = name.rpartition(".")
        owner = blk.get_submodule(owner_name) if owner_name else blk
        fallback, names = _torch_method(owner, method), input_names(blk, name)
        if name == ATTEND:
            fn = OnnxAttend(sessions.session(path), names, blk.attn.nkv, blk.attn.cfg.head_dim, fallback)
        else:
            step = STEPS[name]
            src = owner_of(blk, step)
            weights = {f"{name}/{p}": _np(src.get_parameter(p)) for p in present_params(blk, step)}
            fn = OnnxStep(name, sessions.session(path), names[: len(step.args)], weights, fallback)
        _bind(owner, method, fn)
        summary.steps += 1


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        raise BackendError(f"the ONNX backend runs float32 shards only, this one is {dtype}; "
                           "use --backend torch for other dtypes")


def _apply(blocks, dtype: torch.dtype, cache_dir: Path, threads: int, steps: list[str]) -> OnnxSummary:
    _check_dtype(dtype)
    t0 = time.perf_counter()
    sessions, summary = _Sessions(Path(cache_dir), threads), OnnxSummary()
    for blk in blocks:
        _bind_block(blk, sessions, steps, summary)
    g = sessions.graphs
    summary.exported, summary.reused, summary.export_seconds = g.exported, g.reused, g.export_seconds
    summary.sessions, summary.seconds = len(sessions.by_path), time.perf_counter() - t0
    return summary


def apply_onnx(model: Transformer, cache_dir: Path, threads: int) -> OnnxSummary:
    """Run every block step of this shard with ONNX Runtime; graphs come from / go to cache_dir.
    threads: the device's intra-op threads."""
    steps = [s for part in PARTS.values() for s in part]
    return _apply(model.layers.values(), model.dtype, cache_dir, threads, steps)


def apply_onnx_all(models: list[Transformer], cache_dir: Path, threads: int) -> list[OnnxSummary]:
    """apply_onnx on every shard held by this process (in-process ranks), exporting all their
    missing graphs in a single exporter call: each call costs ~1 s of fixed overhead."""
    steps = [s for part in PARTS.values() for s in part]
    for m in models:
        _check_dtype(m.dtype)
    graphs = GraphCache(Path(cache_dir))
    graphs.prefetch([(blk, _wanted(blk, steps)) for m in models for blk in m.layers.values()])
    out = [apply_onnx(m, cache_dir, threads) for m in models]
    if out:  # the shared export, counted once
        out[0].exported, out[0].export_seconds = graphs.exported, graphs.export_seconds
        out[0].reused -= graphs.exported
    return out


def apply_onnx_block(blk: Block, cache_dir: Path, threads: int, parts=tuple(PARTS)) -> OnnxSummary:
    """The same for one block and some of its PARTS (attention, mlp, connective): what the
    profiler times."""
    return _apply([blk], blk.attn.qkv.weight.dtype, cache_dir, threads, [s for p in parts for s in PARTS[p]])


def remove_onnx(model: Transformer) -> None:
    """Back to torch: drop every step bound by apply_onnx."""
    for blk in model.layers.values():
        for obj in (blk, blk.attn, blk.mlp):
            for name, value in list(vars(obj).items()):
                if isinstance(value, (OnnxStep, OnnxAttend)):
                    del obj.__dict__[name]


def onnx_steps(model: Transformer) -> list[str]:
    """'layer.step' names of the steps currently run by ONNX Runtime (for logs and tests)."""
    out = []
    for idx, blk in model.layers.items():
        for prefix, obj in (("", blk), ("attn.", blk.attn), ("mlp.", blk.mlp)):
            out += [f"{idx}.{prefix}{n}" for n, v in vars(obj).items() if isinstance(v, (OnnxStep, OnnxAttend))]
    return out
