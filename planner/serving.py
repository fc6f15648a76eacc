"""`galaxy plan --serve`: predict each phase placement under a workload and pick the one with the most goodput.

For every candidate of phases.placements (colocated, mixed, disaggregated) this predicts the
unloaded latency (one request alone), TTFT and TPOT percentiles and SLO attainment at the
requested rate, and goodput -- the highest rate with at least 90% of requests meeting both
objectives -- by simulating the engine (simulate.py). Objectives are absolute seconds or, as the
bench's defaults (TTFT <= 3x, TPOT <= 1.5x), multiples of the *colocated* placement's unloaded
latency: what `galaxy bench serve` measures today on the same devices, so one set of absolute
objectives judges every placement.

The choice: the highest goodput; within GOODPUT_TIE of it, the highest attainment at the rate,
then the higher goodput, then the lower P90 TTFT. A placement whose decode is split over several devices and predicted
(one sequence, batch 1) slower than the fastest device that holds the model decoding alone is
never picked (issue #20's goal: split decode must not lose to one device), and the table says so.
A single decode device slower than the fastest may be picked: giving the fastest device the
prompts can be worth more than its decode speed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from .phases import DecodeLayout, PhaseModel, Placement, phase_costs, placements
from .plan import Plan, PlanError, ServePlan, ServePrediction
from .simulate import ATTAINMENT_GOAL, Objectives, SimResult, Workload, goodput, simulate

GOODPUT_TIE = 0.05  # goodputs this close (relative) are a tie, broken by attainment at the rate
SLOWER_TOLERANCE = 1e-3  # a decode this much slower than the fastest device alone is "slower"


@dataclass(frozen=True)
class Objective:
    """An objective in seconds, or (relative=True) a multiple of the colocated unloaded latency."""

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not (self.value > 0 and math.isfinite(self.value)):
            raise PlanError(f"objective: {self.value} must be a positive number")

    def seconds(self, unloaded: float) -> float:
        return self.value * unloaded if self.relative else self.value

    @classmethod
    def parse(cls, text: str) -> Objective:
        """'0.5' (seconds), '500ms', or '3x' (times the unloaded latency)."""
        t = text.strip().lower()
        try:
            if t.endswith("x"):
                return cls(float(t[:-1]), relative=True)
            if t.endswith("ms"):
                return cls(float(t[:-2]) / 1000)
            return cls(float(t[:-1] if t.endswith("s") else t))
        except ValueError:
            raise PlanError(f"objective {text!r}: expected seconds (0.5, 500ms) or a multiple (3x)") from None


@dataclass(frozen=True)
class ServeGoals:
    """The workload and objectives the placement is chosen for."""

    rate: float
    input_len: int = 128
    output_len: int = 32
    ttft: Objective = Objective(3.0, relative=True)
    tpot: Objective = Objective(1.5, relative=True)
    range_ratio: float = 0.0
    num_requests: int = 200
    seed: int = 0
    max_batched_tokens: int = 256
    max_running: int = 64
    sweep: tuple[float, ...] = ()  # rates at which every candidate is also simulated (a bench's --rates)

    def __post_init__(self) -> None:
        if any(not (r > 0 and math.isfinite(r)) for r in self.sweep):
            raise PlanError(f"sweep rates {list(self.sweep)} must be positive numbers")

    def workload(self, rate: float | None = None) -> Workload:
        return Workload(self.rate if rate is None else rate, self.input_len, self.output_len, self.range_ratio,
                        self.num_requests, self.seed)


@dataclass(frozen=True)
class Candidate:
    placement: Placement
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    decode_s: float  # one sequence's decode step at the mean prompt length
    unloaded_ttft: float
    unloaded_tpot: float | None
    at_rate: SimResult
    goodput: float
    excluded: str = ""  # why it may not be picked ("" if it may)
    sweep: tuple[SimResult, ...] = ()  # at each of ServeGoals.sweep's rates

    @property
    def kind(self) -> str:
        return self.placement.kind

    @property
    def label(self) -> str:
        if self.kind == "colocated":
            return f"colocated on {'+'.join(self.prefill)}"
        return f"{self.kind}: prefill {'+'.join(self.prefill)}, decode {'+'.join(self.decode)}"


@dataclass(frozen=True)
class ServeChoice:
    candidates: tuple[Candidate, ...]
    chosen: Candidate
    objectives: Objectives
    fastest_alone: tuple[str, float] | None  # (device, decode s/token) of the fastest device alone
    reason: str
    notes: tuple[str, ...]
    decode_layouts: tuple[tuple[str, float], ...] = ()  # (layout, s/token of one sequence) for comparison
    kv_path: str = ""  # the K/V route the predictions assumed (phases.KVPath.route): the plan tells the runtime

    def plan(self, goals: ServeGoals) -> Plan:
        """The chosen prefill plan, carrying the placement in its `serve` section."""
        c, r = self.chosen, self.chosen.at_rate
        tp50, tp90 = r.tpot(50), r.tpot(90)
        pred = ServePrediction(r.ttft(50), r.ttft(90), None if math.isnan(tp50) else tp50,
                               None if math.isnan(tp90) else tp90, r.attainment, c.goodput, c.decode_s,
                               c.unloaded_ttft, c.unloaded_tpot)
        serve = ServePlan(c.kind, c.prefill, c.decode, goals.rate, goals.input_len, goals.output_len,
                          self.objectives.ttft_s, self.objectives.tpot_s, pred, self.reason,
                          "" if c.kind == "colocated" else self.kv_path)
        return dataclasses.replace(c.placement.prefill, serve=serve)


def _unloaded(costs, goals: ServeGoals, objectives: Objectives) -> SimResult:
    lone = Workload(1.0, goals.input_len, goals.output_len, 0.0, 1, goals.seed)
    return simulate(costs, lone, objectives)


def choose(pm: PhaseModel, goals: ServeGoals) -> ServeChoice:
    """Every placement predicted under `goals`, and the one picked (see the module docstring)."""
    context = goals.input_len + goals.output_len
    cands, notes = placements(pm, goals.input_len, context)
    lengths = sorted({min(goals.input_len, goals.max_batched_tokens), goals.max_batched_tokens,
                      max(1, goals.max_batched_tokens // 8)})
    costs = [phase_costs(pm, p, lengths, goals.max_batched_tokens, goals.max_running) for p in cands]
    # absolute objectives, from the colocated placement's unloaded latency when relative
    probe = Objectives(1.0, 1.0)
    base = _unloaded(costs[0], goals, probe).requests[0]
    base_tpot = base.tpot if base.tpot is not None else pm.decode_s(cands[0].decode, 1, goals.input_len)
    objectives = Objectives(goals.ttft.seconds(base.ttft), goals.tpot.seconds(base_tpot))
    everyone = tuple(range(pm.n))
    alone = [(pm.decode_s(pm.tp_layout((d,), everyone), 1, goals.input_len, everyone), d) for d in range(pm.n)
             if pm.fits(pm.tp_layout((d,), everyone), context)]
    fastest = min(alone) if alone else None
    out = []
    for p, c in zip(cands, costs):
        lone = _unloaded(c, goals, objectives).requests[0]
        d_s = pm.decode_s(p.decode, 1, goals.input_len, p.busy)
        excluded = ""
        if fastest is not None and len(p.decode.devices) > 1 and d_s > fastest[0] * (1 + SLOWER_TOLERANCE):
            excluded = (f"its decode ({1e3 * d_s:.1f} ms/token) is slower than "
                        f"{pm.names([fastest[1]])[0]} alone ({1e3 * fastest[0]:.1f} ms/token)")
        start = 1.0 / max(1e-9, lone.last_s - lone.arrival_s)
        out.append(Candidate(p, tuple(pm.names(p.prefill_devices)), tuple(pm.names(p.decode.devices)), d_s,
                             lone.ttft, lone.tpot, simulate(c, goals.workload(), objectives),
                             goodput(c, goals.workload(), objectives, start), excluded,
                             tuple(simulate(c, goals.workload(r), objectives) for r in goals.sweep)))
    allowed = [c for c in out if not c.excluded] or out
    best_g = max(c.goodput for c in allowed)
    close = [c for c in allowed if c.goodput >= best_g * (1 - GOODPUT_TIE)]
    # rounded: placements alike up to float noise keep the order of `placements` (the simpler first)
    chosen = min(close, key=lambda c: (-round(c.at_rate.attainment, 6), -round(c.goodput, 6),
                                       round(c.at_rate.ttft(90), 6), out.index(c)))
    fa = None if fastest is None else (pm.names([fastest[1]])[0], fastest[0])
    if any(c.kind != "colocated" for c in cands):
        notes.append(f"K/V between the groups: {pm.kv_path.describe()}")
    return ServeChoice(tuple(out), chosen, objectives, fa, _reason(chosen, out, objectives, fa), tuple(notes),
                       decode_layouts(pm, cands[0], goals.input_len, context), pm.kv_path.route)


def decode_layouts(pm: PhaseModel, colocated: Placement, input_len: int, context: int) -> tuple:
    """Decode s/token (one sequence, a prompt of input_len) of each device alone, of the k devices
    of the most bytes/s as a tensor-parallel group for k = 2..N, and of the colocated plan's split."""
    everyone = tuple(range(pm.n))
    out = []
    for d in everyone:
        lay = pm.tp_layout((d,), everyone)
        if pm.fits(lay, context):
            out.append((pm.names([d])[0], pm.decode_s(lay, 1, input_len, everyone)))
    ranked = sorted(everyone, key=lambda i: (-pm.rate[i], i))
    for k in range(2, pm.n + 1):
        lay = pm.tp_layout(tuple(sorted(ranked[:k])), everyone)
        if pm.fits(lay, context):
            out.append((f"tp {'+'.join(pm.names(lay.devices))}", pm.decode_s(lay, 1, input_len, everyone)))
    out.append(("colocated split", pm.decode_s(colocated.decode, 1, input_len, colocated.busy)))
    return tuple(out)


def _reason(c: Candidate, cands: list[Candidate], o: Objectives, fastest) -> str:
    """One sentence: what the chosen placement sustains, against the best other kind, and why."""
    others = [x for x in cands if x.kind != c.kind and not x.excluded]
    goal = (f"at least {100 * ATTAINMENT_GOAL:.0f}% of requests within TTFT {1e3 * o.ttft_s:.0f} ms and TPOT "
            f"{1e3 * o.tpot_s:.0f} ms")
    head = f"{c.label} sustains {c.goodput:.3g} req/s with {goal}"
    if not others:
        return head + " (no other kind of placement fits or may be picked)."
    rival = max(others, key=lambda x: (x.goodput, x.at_rate.attainment))
    cmp_ = f", against {rival.goodput:.3g} req/s for {rival.label}"
    if c.goodput <= rival.goodput * (1 + GOODPUT_TIE):
        cmp_ += (f", and meets them for {100 * c.at_rate.attainment:.0f}% of requests at "
                 f"{c.at_rate.rate:g} req/s (vs {100 * rival.at_rate.attainment:.0f}%)")
    mine, theirs = f"{1e3 * c.decode_s:.1f}", f"{1e3 * rival.decode_s:.1f}"
    if c.kind == "colocated":
        if rival.unloaded_ttft > c.unloaded_ttft * (1 + GOODPUT_TIE):
            why = (f"separating the phases would cost more in prompt time (unloaded TTFT "
                   f"{_ms(rival.unloaded_ttft)} ms against {_ms(c.unloaded_ttft)}: fewer prefill devices and "
                   "the KV transfer) than it saves in interference")
        elif rival.decode_s > c.decode_s * (1 + SLOWER_TOLERANCE):
            why = f"decode here takes {mine} ms/token, on {'+'.join(rival.decode)} {theirs}"
        else:
            why = "the interference of prompts with decodes costs less here than giving up devices for either phase"
    elif c.decode_s < rival.decode_s * (1 - SLOWER_TOLERANCE):
        why = f"decode on {'+'.join(c.decode)} takes {mine} ms/token against {theirs} for {rival.kind}"
    elif c.unloaded_ttft < rival.unloaded_ttft * (1 - GOODPUT_TIE):
        why = (f"its prompts run on {'+'.join(c.prefill)} (unloaded TTFT {_ms(c.unloaded_ttft)} ms against "
               f"{_ms(rival.unloaded_ttft)}) while decode on {'+'.join(c.decode)} keeps {mine} ms/token")
    elif c.kind == "disaggregated":
        why = f"prompts never stall its decodes ({mine} ms/token on {'+'.join(c.decode)}, {theirs} for {rival.kind})"
    else:
        why = f"its decode on {'+'.join(c.decode)} ({mine} ms/token) keeps up with {rival.kind}'s ({theirs})"
    return f"{head}{cmp_}: {why}."


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{1e3 * x:.0f}"


def table(choice: ServeChoice) -> str:
    """The candidates as `galaxy plan --serve` prints them, the choice and why."""
    o = choice.objectives
    rate = choice.chosen.at_rate.rate
    head = (f"{'placement':<14} {'prefill':<24} {'decode':<18} {'decode':>9} {'TTFT p50/p90':>13} "
            f"{'TPOT p50/p90':>13} {'SLO met':>8} {'goodput':>8}")
    units = f"{'':<14} {'':<24} {'':<18} {'ms/tok':>9} {'ms':>13} {'ms':>13} {f'@{rate:g}/s':>8} {'req/s':>8}"
    lines = [f"objectives: TTFT <= {_ms(o.ttft_s)} ms, TPOT <= {_ms(o.tpot_s)} ms; goodput: the highest Poisson "
             f"rate with >= {100 * ATTAINMENT_GOAL:.0f}% of requests meeting both (simulated)", "", head, units]
    for c in choice.candidates:
        r = c.at_rate
        mark = "*" if c is choice.chosen else " "
        lines.append(f"{mark}{c.kind:<13} {'+'.join(c.prefill):<24} {'+'.join(c.decode):<18} "
                     f"{1e3 * c.decode_s:>9.1f} {_ms(r.ttft(50)) + '/' + _ms(r.ttft(90)):>13} "
                     f"{_ms(r.tpot(50)) + '/' + _ms(r.tpot(90)):>13} {100 * r.attainment:>7.0f}% "
                     f"{c.goodput:>8.3g}" + (f"   not picked: {c.excluded}" if c.excluded else ""))
    lines.append("")
    for c in choice.candidates:
        if c.sweep:
            lines.append(f"{c.label}: SLO met at " + ", ".join(f"{r.rate:g}" for r in c.sweep) + " req/s: "
                         + " / ".join(f"{100 * r.attainment:.0f}%" for r in c.sweep)
                         + "; TTFT p50/p90, TPOT p50/p90 ms: "
                         + " | ".join(f"{_ms(r.ttft(50))}/{_ms(r.ttft(90))}, {_ms(r.tpot(50))}/{_ms(r.tpot(90))}"
                                      for r in c.sweep)
                         + f"; unloaded TTFT {_ms(c.unloaded_ttft)} TPOT {_ms(c.unloaded_tpot)} ms")
    if any(c.sweep for c in choice.candidates):
        lines.append("")
    if choice.fastest_alone is not None:
        name, s = choice.fastest_alone
        lines.append(f"decode: the fastest device alone is {name} at {1e3 * s:.1f} ms/token; a decode split over "
                     "devices predicted slower than it is never picked")
    else:
        lines.append("decode: no device holds the model alone, so decode runs split")
    if choice.decode_layouts:
        lines.append("decode ms/token, one sequence: " + ", ".join(f"{name} {1e3 * t:.1f}"
                                                                    for name, t in choice.decode_layouts))
    lines += [f"note: {n}" for n in choice.notes]
    lines.append(f"chosen: {choice.reason}")
    return "\n".join(lines)


# --- the decode layout of one loaded model (issue #20: adding devices never slows decode) ----------------------

@dataclass(frozen=True)
class DecodeOption:
    """One way to decode a loaded model: `kind` "split" (tensor-parallel on the loaded split of every
    device), "tp" (tensor-parallel on fewer devices, an even split) or "one" (one device holding the
    whole model beside its prefill shard: a mixed placement); its predicted seconds per token (one
    sequence), and why it may not be chosen ("" if it may)."""

    kind: str
    name: str
    layout: DecodeLayout
    seconds: float
    excluded: str = ""


@dataclass(frozen=True)
class DecodeChoice:
    options: tuple[DecodeOption, ...]
    chosen: DecodeOption
    reason: str

    def line(self) -> str:
        """One line: the layout, each candidate's predicted ms/token, why."""
        cands = ", ".join(f"{o.name} {1e3 * o.seconds:.1f}" + (" (refused: " + o.excluded + ")" if o.excluded else "")
                          for o in self.options)
        return (f"decode layout: {self.chosen.name} (planner, predicted ms/token: {cands}); {self.reason}")


def decode_options(pm: PhaseModel, split: DecodeLayout, context: int,
                   refuse: Callable[[DecodeLayout], str] | None = None) -> list[DecodeOption]:
    """The decode layouts of a model loaded on `split` (the devices' prefill split), priced for one
    sequence at `context` positions with only the decode devices busy (one request: the prefill group
    idles while it decodes): the split itself; the k = 2..N-1 devices of the most bytes/s, evenly
    (an even tensor-parallel split, as the runtime loads a decode group); each device alone. A
    layout `refuse` names a reason for (memory: the runtime's exact check), or whose devices'
    profiled memory does not hold it beside their prefill shares (PhaseModel.fits, when no `refuse` is
    given), is excluded."""
    ranked = sorted(split.devices, key=lambda i: (-pm.rate[i], i))
    share = dict(zip(split.devices, split.shares))

    def verdict(lay: DecodeLayout) -> str:
        if refuse is not None:
            return refuse(lay)
        beside = {i: share[i] * pm.weight_bytes for i in lay.devices}
        if lay is not split and not pm.fits(lay, context, beside):
            return "its devices' memory does not hold it beside their prefill shares"
        return ""

    out = [DecodeOption("split", f"split {'+'.join(pm.names(split.devices))}", split,
                        pm.decode_s(split, 1, context, split.devices), verdict(split))]
    for k in range(2, len(ranked)):
        group = tuple(sorted(ranked[:k]))
        lay = DecodeLayout("tp", group, tuple(1 / k for _ in group))
        out.append(DecodeOption("tp", f"tp {'+'.join(pm.names(group))}", lay, pm.decode_s(lay, 1, context, group),
                                verdict(lay)))
    for d in split.devices if len(split.devices) > 1 else ():
        lay = pm.tp_layout((d,))
        out.append(DecodeOption("one", f"{pm.names([d])[0]} alone", lay, pm.decode_s(lay, 1, context, (d,)),
                                verdict(lay)))
    return out


def choose_decode(options: list[DecodeOption]) -> DecodeChoice:
    """The layout predicted fastest among those not refused; within SLOWER_TOLERANCE of it the earlier
    in `options` (the split first: no K/V moves and no second copy of the weights)."""
    allowed = [o for o in options if not o.excluded]
    if not allowed:
        raise PlanError("no decode layout fits: " + "; ".join(f"{o.name}: {o.excluded}" for o in options))
    best = min(o.seconds for o in allowed)
    chosen = next(o for o in allowed if o.seconds <= best * (1 + SLOWER_TOLERANCE))
    split = options[0]
    if chosen is split:
        others = [o for o in allowed if o is not split]
        why = (f"it is predicted fastest ({1e3 * split.seconds:.1f} ms/token against "
               f"{1e3 * min(o.seconds for o in others):.1f} for the next)" if others else "no other layout fits")
    else:
        why = f"it is predicted fastest: {1e3 * chosen.seconds:.1f} ms/token against {1e3 * split.seconds:.1f} split"
        if split.excluded:
            why += f" (the split is refused: {split.excluded})"
        if chosen.kind == "one":
            why += "; it holds the whole model beside its prefill shard and also prefills (a mixed placement)"
    return DecodeChoice(tuple(options), chosen, why)
