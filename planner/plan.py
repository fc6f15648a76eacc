"""The plan file: what the solver decided, as frozen dataclasses and a validated JSON form.

A `Plan` names the model it was made for (name, family, a fingerprint of the shape), the
sequence length, the strategy, and the devices in ring (or stage) order with what each holds,
the memory it will use and the predicted time per layer; plus the predicted latency of every
strategy the solver compared and why it chose the one it did. `to_partition` turns it into the
`galaxy.parallel.sharding.Partition` the runtime executes. planner/plan.schema.json describes the file.

Every field is checked on construction and when read; a `PlanError` names the field, e.g.
"devices[1].heads: -2 is negative" or "heads sum to 11, model has 12".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from galaxy.errors import GalaxyError
from galaxy.model.config import FAMILIES, ModelConfig
from galaxy.model.quant import FormatError, parse_format
from galaxy.parallel.codec import FORMATS as WIRE_FORMATS
from galaxy.parallel.sharding import Partition, PartitionError

from .strategy import PLANNED, RUNNABLE, TENSOR_FIELDS, PlanStrategy

PLAN_VERSION = 1
# Strategies a plan may hold; local is one device, run as a one-device galaxy partition (every
# collective a no-op).

# Shape fields the fingerprint covers: everything that changes who holds which bytes.
_SHAPE_FIELDS = ("family", "vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn",
                 "max_positions", "causal", "norm", "gated_mlp", "position", "position_offset", "type_vocab_size",
                 "embed_norm", "final_norm", "attn_bias", "out_bias", "mlp_bias", "tie_embeddings")


class PlanError(GalaxyError, ValueError):
    """A plan that is malformed, does not fit the model, or cannot be made; names the field."""


def fingerprint(cfg: ModelConfig) -> str:
    """16 hex digits identifying the model's shape (not its name or weights)."""
    d = {k: getattr(cfg, k) for k in _SHAPE_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelRef:
    name: str
    family: str
    fingerprint: str
    n_layers: int
    n_heads: int
    ffn: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelRef:
        return cls(cfg.name, cfg.family, fingerprint(cfg), cfg.n_layers, cfg.n_heads, cfg.ffn, cfg.vocab_size)


@dataclass(frozen=True)
class DeviceMemory:
    weights_bytes: int = 0
    activation_bytes: int = 0
    budget_bytes: int = 0

    @property
    def used_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes


@dataclass(frozen=True)
class DeviceTiming:
    """Predicted seconds per layer on this device (pipeline: per layer of its stage)."""

    compute_s: float = 0.0
    comm_s: float = 0.0  # the rest of the layer: wire time overlap did not hide, waiting at collectives


@dataclass(frozen=True)
class DevicePlan:
    name: str
    address: str
    heads: int = 0  # query heads
    mlp_cols: int = 0  # MLP intermediate columns
    vocab_rows: int = 0  # embedding / LM-head rows
    tokens: int = 0  # rows of the planned sequence in the connective blocks
    layers: int = 0  # layers held (pipeline stages; the whole model otherwise)
    memory: DeviceMemory = field(default_factory=DeviceMemory)
    predicted: DeviceTiming = field(default_factory=DeviceTiming)
    wire: tuple[str, ...] = ()  # format sent to each device, in ring order (empty: fp32 everywhere)


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    latency_s: float | None  # None: infeasible
    reason: str = ""


METHODS = ("exact", "heuristic")  # how the solver searched (planner/solver.py)


@dataclass(frozen=True)
class SolverRun:
    """How the plan was found: the search the solver ran and how long it took."""

    method: str  # "exact": every subset and ring order priced; "heuristic": the polynomial search
    seconds: float  # wall time of solve(), on the machine that planned
    devices: int = 0  # devices the solver chose among (0: not recorded)


PLACEMENTS = ("colocated", "disaggregated", "mixed")  # planner/simulate.py simulates each
# how K/V reach the decode group (phases.KVPath; the runtime's kv_path, engine/disagg.py), the default first:
# "direct" one hop from each prefill worker to each decode worker, "coordinator" two hops through it
KV_PATHS = ("direct", "coordinator")
DEFAULT_KV_PATH = KV_PATHS[0]


@dataclass(frozen=True)
class ServePrediction:
    """What the simulator predicts for the chosen placement (planner/serving.py); seconds, req/s."""

    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float | None  # None: one output token, no TPOT
    tpot_p90_s: float | None
    attainment: float  # share of requests meeting both objectives at `rate`
    goodput_rps: float  # highest rate with >= 90% attainment
    decode_s_per_token: float  # one sequence's decode step on the decode devices
    unloaded_ttft_s: float
    unloaded_tpot_s: float | None


@dataclass(frozen=True)
class ServePlan:
    """Where each phase runs (`galaxy plan --serve`): the plan's devices run the prefill; decode runs
    on `decode` (colocated: the same devices; disaggregated: others; mixed: some of both)."""

    placement: str
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    rate: float  # requests/s the prediction is for
    input_len: int
    output_len: int
    ttft_slo_s: float
    tpot_slo_s: float
    predicted: ServePrediction
    reason: str = ""
    kv_path: str = ""  # the K/V route the prediction assumed (KV_PATHS), which `load` then takes; "": not recorded


@dataclass(frozen=True)
class Plan:
    strategy: str
    devices: tuple[DevicePlan, ...]  # in ring / stage order
    seq_len: int | None = None  # tokens the split was planned for
    model: ModelRef | None = None
    dtype_bytes: int = 4
    latency_s: float | None = None  # predicted for the chosen strategy
    strategies: tuple[StrategyResult, ...] = ()  # every strategy compared
    reason: str = ""  # why this strategy
    unused: tuple[tuple[str, str], ...] = ()  # (device name, why it was left out)
    version: int = PLAN_VERSION
    solver: SolverRun | None = None  # None: a plan written before solve times were recorded
    weights_format: str = "fp32"  # how the devices hold their linears (galaxy.model.quant); memory is sized by it
    serve: ServePlan | None = None  # phase placement (galaxy plan --serve); None: prefill plan only

    def __post_init__(self) -> None:
        _check_plan(self)

    # -- use ----------------------------------------------------------------------------
    def addresses(self) -> list[str]:
        """Worker addresses in ring / stage order."""
        return [d.address for d in self.devices]

    def wire(self) -> list[list[str]] | None:
        """wire[i][j]: format ring device i sends to j; None when every link carries fp32."""
        if not any(x.wire for x in self.devices):
            return None
        n = len(self.devices)
        return [list(x.wire) if x.wire else ["fp32"] * n for x in self.devices]

    def with_wire(self, wire: list[list[str]], names: list[str]) -> Plan:
        """This plan carrying per-link activation formats. wire[i][j] is the format the device named
        names[i] sends to names[j] (the profile's order); each planned device keeps its row, in ring order."""
        index = {name: i for i, name in enumerate(names)}
        ring = [index[d.name] for d in self.devices]
        return dataclasses.replace(self, devices=tuple(
            dataclasses.replace(d, wire=tuple(wire[ring[k]][m] for m in ring)) for k, d in enumerate(self.devices)))

    def result(self, strategy: str) -> StrategyResult | None:
        return next((r for r in self.strategies if r.strategy == strategy), None)

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise PlanError if the plan was made for another model shape than cfg."""
        if self.model is not None and self.model.fingerprint != fingerprint(cfg):
            raise PlanError(f"model.fingerprint: the plan was made for {self.model.name or self.model.family!r} "
                            f"({self.model.fingerprint}), this model {cfg.name or cfg.family!r} is "
                            f"{fingerprint(cfg)}; re-plan for it")
        _check_shape(self, _Shape(cfg.n_layers, cfg.n_heads, cfg.ffn, cfg.vocab_size))

    def to_partition(self, cfg: ModelConfig) -> Partition:
        """The runtime's layout. galaxy/local: heads, columns, vocab rows in ring order and the
        planned token counts as seq_weights (other lengths split proportionally); megatron: its
        split; pipeline: layers per stage."""
        self.check_model(cfg)
        counts = {k: tuple(getattr(x, k) for x in self.devices) for k in (*TENSOR_FIELDS, "tokens", "layers")}
        try:
            return PlanStrategy(self.strategy).partition(cfg, **counts)
        except PartitionError as e:
            raise PlanError(str(e)) from None

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        m = self.model
        out: dict = {"version": self.version}
        if m is not None:
            out["model"] = {"name": m.name, "family": m.family, "fingerprint": m.fingerprint,
                            "n_layers": m.n_layers, "n_heads": m.n_heads, "ffn": m.ffn, "vocab_size": m.vocab_size}
        if self.seq_len is not None:
            out["seq_len"] = self.seq_len
        out.update(strategy=self.strategy, dtype_bytes=self.dtype_bytes, latency_s=self.latency_s,
                   reason=self.reason)
        if self.weights_format != "fp32":
            out["weights_format"] = self.weights_format
        out["devices"] = [{
            "name": x.name, "address": x.address, "heads": x.heads, "mlp_cols": x.mlp_cols,
            "vocab_rows": x.vocab_rows, "tokens": x.tokens, "layers": x.layers,
            "memory": {"weights_bytes": x.memory.weights_bytes, "activation_bytes": x.memory.activation_bytes,
                       "budget_bytes": x.memory.budget_bytes},
            "predicted": {"compute_s": x.predicted.compute_s, "comm_s": x.predicted.comm_s},
            **({"wire": list(x.wire)} if x.wire else {}),
        } for x in self.devices]
        out["strategies"] = {r.strategy: {"latency_s": r.latency_s, "reason": r.reason} for r in self.strategies}
        out["unused"] = [{"name": nm, "reason": why} for nm, why in self.unused]
        if self.solver is not None:
            out["solver"] = {"method": self.solver.method, "seconds": self.solver.seconds,
                             "devices": self.solver.devices}
        if self.serve is not None:
            v = self.serve
            out["serve"] = {"placement": v.placement, "prefill": list(v.prefill), "decode": list(v.decode),
                            "workload": {"rate": v.rate, "input_len": v.input_len, "output_len": v.output_len},
                            "objectives": {"ttft_s": v.ttft_slo_s, "tpot_s": v.tpot_slo_s},
                            "predicted": dataclasses.asdict(v.predicted), "reason": v.reason}
            if v.kv_path:
                out["serve"]["kv_path"] = v.kv_path
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d, cfg: ModelConfig | None = None, addresses: Iterable[str] | None = None) -> Plan:
        plan = _read_plan(d)
        if cfg is not None:
            plan.check_model(cfg)
        if addresses is not None:
            known = list(addresses)
            for i, x in enumerate(plan.devices):
                if x.address not in known:
                    raise PlanError(f"devices[{i}].address: {x.address!r} is not one of the cluster's "
                                    f"addresses {known}")
        return plan

    @classmethod
    def from_json(cls, text: str, cfg: ModelConfig | None = None, addresses: Iterable[str] | None = None) -> Plan:
        """Read and validate a plan file. With cfg, check it was made for that model shape; with
        addresses, check every device is one of them."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(d, cfg, addresses)


# --- validation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shape:
    n_layers: int
    n_heads: int
    ffn: int
    vocab_size: int


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _names(strategies) -> str:
    return ", ".join(map(str, strategies))


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise PlanError(msg)


def _count(path: str, x) -> None:
    _need(_is_int(x), f"{path}: {x!r} is not an integer")
    _need(x >= 0, f"{path}: {x} is negative")


def _seconds(path: str, x, optional=False) -> None:
    if optional and x is None:
        return
    _need(_is_num(x), f"{path}: {x!r} is not a number")
    _need(x >= 0, f"{path}: {x} is negative")


def _text(path: str, x, empty_ok=False) -> None:
    _need(isinstance(x, str), f"{path}: {x!r} is not a string")
    _need(empty_ok or x != "", f"{path}: is empty")




def _check_plan(p: Plan) -> None:
    _need(_is_int(p.version) and p.version == PLAN_VERSION,
          f"version: {p.version!r} is not supported (this planner reads version {PLAN_VERSION})")
    _need(p.strategy in RUNNABLE, f"strategy: {p.strategy!r} is not one of {_names(RUNNABLE)}")
    _need(len(p.devices) > 0, "devices: a plan needs at least one device")
    _need(p.strategy != "local" or len(p.devices) == 1, f"devices: local runs on one device, the plan has "
          f"{len(p.devices)}")
    if p.seq_len is not None:
        _need(_is_int(p.seq_len) and p.seq_len > 0, f"seq_len: {p.seq_len!r} is not a positive integer")
    _need(_is_int(p.dtype_bytes) and p.dtype_bytes in (1, 2, 4, 8),
          f"dtype_bytes: {p.dtype_bytes!r} is not 1, 2, 4 or 8")
    _seconds("latency_s", p.latency_s, optional=True)
    _text("reason", p.reason, empty_ok=True)
    names, addrs = {}, {}
    for i, x in enumerate(p.devices):
        at = f"devices[{i}]"
        _text(f"{at}.name", x.name)
        _text(f"{at}.address", x.address)
        _need(x.name not in names, f"{at}.name: {x.name!r} is also devices[{names.get(x.name)}]")
        _need(x.address not in addrs, f"{at}.address: {x.address!r} is also devices[{addrs.get(x.address)}]")
        names[x.name], addrs[x.address] = i, i
        for k in ("heads", "mlp_cols", "vocab_rows", "tokens", "layers"):
            _count(f"{at}.{k}", getattr(x, k))
        for k in ("weights_bytes", "activation_bytes", "budget_bytes"):
            _count(f"{at}.memory.{k}", getattr(x.memory, k))
        for k in ("compute_s", "comm_s"):
            _seconds(f"{at}.predicted.{k}", getattr(x.predicted, k))
    if PlanStrategy(p.strategy).splits_tokens and p.seq_len is not None:
        total = sum(x.tokens for x in p.devices)
        _need(total == p.seq_len, f"tokens sum to {total}, seq_len is {p.seq_len}")
    for r in p.strategies:
        _need(r.strategy in PLANNED, f"strategies: {r.strategy!r} is not one of {_names(PLANNED)}")
        _seconds(f"strategies.{r.strategy}.latency_s", r.latency_s, optional=True)
        _text(f"strategies.{r.strategy}.reason", r.reason, empty_ok=True)
    if p.solver is not None:
        _need(p.solver.method in METHODS, f"solver.method: {p.solver.method!r} is not one of {METHODS}")
        _seconds("solver.seconds", p.solver.seconds)
        _count("solver.devices", p.solver.devices)
    if p.serve is not None:
        _check_serve(p.serve, [x.name for x in p.devices])
    for i, (nm, why) in enumerate(p.unused):
        _text(f"unused[{i}].name", nm)
        _text(f"unused[{i}].reason", why, empty_ok=True)
    if p.model is not None:
        m = p.model
        _text("model.name", m.name, empty_ok=True)
        _need(m.family in FAMILIES, f"model.family: {m.family!r} is not one of {FAMILIES}")
        _text("model.fingerprint", m.fingerprint)
        for k in ("n_layers", "n_heads", "ffn", "vocab_size"):
            v = getattr(m, k)
            _need(_is_int(v) and v > 0, f"model.{k}: {v!r} is not a positive integer")
        _check_shape(p, _Shape(m.n_layers, m.n_heads, m.ffn, m.vocab_size))


def _check_serve(v: ServePlan, planned: list[str]) -> None:
    _need(v.placement in PLACEMENTS, f"serve.placement: {v.placement!r} is not one of {_names(PLACEMENTS)}")
    for side in ("prefill", "decode"):
        names = getattr(v, side)
        _need(len(names) > 0, f"serve.{side}: needs at least one device")
        for i, nm in enumerate(names):
            _text(f"serve.{side}[{i}]", nm)
        _need(len(set(names)) == len(names), f"serve.{side}: {list(names)} names a device twice")
    _need(sorted(v.prefill) == sorted(planned), f"serve.prefill: {list(v.prefill)} are not the plan's devices "
          f"{planned} (the plan is the prefill group's)")
    both = set(v.prefill) & set(v.decode)
    if v.placement == "colocated":
        _need(set(v.decode) == set(v.prefill), f"serve.decode: colocated decodes on the prefill devices "
              f"{list(v.prefill)}, not {list(v.decode)}")
    elif v.placement == "disaggregated":
        _need(not both, f"serve.decode: disaggregated, but {sorted(both)} also prefill")
    else:
        _need(both and set(v.decode) != set(v.prefill), f"serve.decode: mixed shares some but not all devices "
              f"with the prefill; prefill {list(v.prefill)}, decode {list(v.decode)}")
    _need(_is_num(v.rate) and v.rate > 0, f"serve.workload.rate: {v.rate!r} is not a positive number")
    for k in ("input_len", "output_len"):
        x = getattr(v, k)
        _need(_is_int(x) and x > 0, f"serve.workload.{k}: {x!r} is not a positive integer")
    for k, x in (("ttft_s", v.ttft_slo_s), ("tpot_s", v.tpot_slo_s)):
        _need(_is_num(x) and x > 0, f"serve.objectives.{k}: {x!r} is not a positive number")
    pred = v.predicted
    for f in dataclasses.fields(pred):
        x = getattr(pred, f.name)
        _seconds(f"serve.predicted.{f.name}", x, optional=f.name in _OPTIONAL_PREDICTIONS)
    _need(pred.attainment <= 1, f"serve.predicted.attainment: {pred.attainment} is above 1")
    _text("serve.reason", v.reason, empty_ok=True)
    _need(v.kv_path in ("", *KV_PATHS), f"serve.kv_path: {v.kv_path!r} is not one of {_names(KV_PATHS)}")


_OPTIONAL_PREDICTIONS = {"tpot_p50_s", "tpot_p90_s", "unloaded_tpot_s"}


def _check_shape(p: Plan, m: _Shape) -> None:
    """Counts against the model: sums for split fields, whole-model values for replicated ones."""
    d = p.devices
    split = {"heads": m.n_heads, "mlp_cols": m.ffn, "vocab_rows": m.vocab_size}
    label = {"heads": "heads", "mlp_cols": "mlp_cols", "vocab_rows": "vocab_rows"}
    if PlanStrategy(p.strategy).tensor_parallel:
        for k, total in split.items():
            s = sum(getattr(x, k) for x in d)
            _need(s == total, f"{label[k]} sum to {s}, model has {total}")
        for i, x in enumerate(d):
            _need(x.layers in (0, m.n_layers), f"devices[{i}].layers: {x.layers}, but a {p.strategy} device holds "
                  f"all {m.n_layers} layers")
    if p.strategy == "pipeline":
        s = sum(x.layers for x in d)
        _need(s == m.n_layers, f"layers sum to {s}, model has {m.n_layers}")
    if p.strategy in ("pipeline", "seqpar"):
        for i, x in enumerate(d):
            for k, total in split.items():
                v = getattr(x, k)
                _need(v in (0, total), f"devices[{i}].{k}: {v}, but a {p.strategy} device holds all {total}")


_TOP = {"version", "model", "seq_len", "strategy", "dtype_bytes", "weights_format", "latency_s", "reason", "devices",
        "strategies", "unused", "solver", "serve"}
_SERVE = {"placement", "prefill", "decode", "workload", "objectives", "predicted", "reason", "kv_path"}
_SERVE_PREDICTED = {f.name for f in dataclasses.fields(ServePrediction)}
_DEVICE = {"name", "address", "heads", "mlp_cols", "vocab_rows", "tokens", "layers", "memory", "predicted", "wire"}
_MODEL = {"name", "family", "fingerprint", "n_layers", "n_heads", "ffn", "vocab_size"}
_MEMORY = {"weights_bytes", "activation_bytes", "budget_bytes"}
_PREDICTED = {"compute_s", "comm_s"}
_SOLVER = {"method", "seconds", "devices"}


def _object(path: str, d, keys: set, required=()) -> dict:
    where = f"{path}: " if path else "plan: "
    _need(isinstance(d, dict), f"{where}expected an object, got {type(d).__name__}")
    for k in d:
        _need(k in keys, f"unknown {'top-level ' if not path else ''}key {k!r}{' in ' + path if path else ''}; "
              f"known: {sorted(keys)}")
    for k in required:
        _need(k in d, f"{path + '.' if path else ''}{k}: missing (required)")
    return d


def _read_plan(d) -> Plan:
    d = _object("", d, _TOP, required=("version", "devices"))
    _need(_is_int(d["version"]) and d["version"] == PLAN_VERSION,
          f"version: {d['version']!r} is not supported (this planner reads version {PLAN_VERSION})")
    strategy = d.get("strategy", "galaxy")
    _need(isinstance(strategy, str) and strategy in RUNNABLE,
          f"strategy: {strategy!r} is not one of {_names(RUNNABLE)}")
    model = None
    if "model" in d:
        m = _object("model", d["model"], _MODEL, required=tuple(sorted(_MODEL)))
        model = ModelRef(**m)
    _need(isinstance(d["devices"], list), f"devices: expected a list, got {type(d['devices']).__name__}")
    devices = []
    for i, x in enumerate(d["devices"]):
        at = f"devices[{i}]"
        x = _object(at, x, _DEVICE, required=("address", *PlanStrategy(strategy).fields))
        mem = _object(f"{at}.memory", x.get("memory", {}), _MEMORY)
        pred = _object(f"{at}.predicted", x.get("predicted", {}), _PREDICTED)
        for k, v in x.items():  # type errors before the dataclass would compare them
            if k in ("heads", "mlp_cols", "vocab_rows", "tokens", "layers"):
                _count(f"{at}.{k}", v)
        fields = {k: x[k] for k in ("heads", "mlp_cols", "vocab_rows", "tokens", "layers") if k in x}
        wire = x.get("wire", [])
        _need(isinstance(wire, list) and all(w in WIRE_FORMATS for w in wire) and len(wire) in (0, len(d["devices"])),
              f"{at}.wire: expected one of {WIRE_FORMATS} per device, got {wire!r}")
        devices.append(DevicePlan(x.get("name", x["address"]), x["address"], **fields,
                                  memory=DeviceMemory(**mem), predicted=DeviceTiming(**pred), wire=tuple(wire)))
    strategies = []
    sd = d.get("strategies", {})
    _need(isinstance(sd, dict), f"strategies: expected an object, got {type(sd).__name__}")
    for k, v in sd.items():
        _need(k in PLANNED, f"strategies: {k!r} is not one of {_names(PLANNED)}")
        v = _object(f"strategies.{k}", v, {"latency_s", "reason"}, required=("latency_s",))
        strategies.append(StrategyResult(k, v["latency_s"], v.get("reason", "")))
    unused = []
    ud = d.get("unused", [])
    _need(isinstance(ud, list), f"unused: expected a list, got {type(ud).__name__}")
    for i, u in enumerate(ud):
        u = _object(f"unused[{i}]", u, {"name", "reason"}, required=("name",))
        unused.append((u["name"], u.get("reason", "")))
    solver = None
    if "solver" in d:
        sv = _object("solver", d["solver"], _SOLVER, required=("method", "seconds"))
        _count("solver.devices", sv.get("devices", 0))
        solver = SolverRun(sv["method"], sv["seconds"], sv.get("devices", 0))
    fmt = d.get("weights_format", "fp32")
    _need(isinstance(fmt, str), f"weights_format: {fmt!r} is not a string")
    try:
        parse_format(fmt)
    except FormatError as e:
        raise PlanError(f"weights_format: {e}") from None
    serve = _read_serve(d["serve"]) if "serve" in d else None
    return Plan(strategy, tuple(devices), d.get("seq_len"), model, d.get("dtype_bytes", 4), d.get("latency_s"),
                tuple(strategies), d.get("reason", ""), tuple(unused), d["version"], solver, fmt, serve)


def _read_serve(d) -> ServePlan:
    d = _object("serve", d, _SERVE, required=("placement", "prefill", "decode", "workload", "objectives",
                                               "predicted"))
    for side in ("prefill", "decode"):
        _need(isinstance(d[side], list), f"serve.{side}: expected a list of device names, got {d[side]!r}")
    w = _object("serve.workload", d["workload"], {"rate", "input_len", "output_len"},
                required=("rate", "input_len", "output_len"))
    o = _object("serve.objectives", d["objectives"], {"ttft_s", "tpot_s"}, required=("ttft_s", "tpot_s"))
    p = _object("serve.predicted", d["predicted"], _SERVE_PREDICTED,
                required=tuple(sorted(_SERVE_PREDICTED - _OPTIONAL_PREDICTIONS)))
    pred = ServePrediction(**{k: p.get(k) for k in sorted(_SERVE_PREDICTED)})
    return ServePlan(d["placement"], tuple(d["prefill"]), tuple(d["decode"]), w["rate"], w["input_len"],
                     w["output_len"], o["ttft_s"], o["tpot_s"], pred, d.get("reason", ""), d.get("kv_path", ""))
