"""A plan for people: a text table per device and per strategy, and a chart (SVG or PNG)."""

from __future__ import annotations

from pathlib import Path

from galaxy.units import fmt_bytes

from .plan import Plan, PlanError


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def table(plan: Plan) -> str:
    """Devices in ring order with their shares, memory and predicted time per layer, then every
    strategy's predicted latency and the reason for the choice."""
    m = plan.model
    lines = [f"plan      {plan.strategy} on {len(plan.devices)} device(s)"
             + (f", {m.name or m.family} ({m.fingerprint})" if m else "")
             + (f", seq_len {plan.seq_len}" if plan.seq_len else "")
             + (f", predicted {_ms(plan.latency_s)}" if plan.latency_s is not None else "")]
    head = ("device", "heads", "mlp_cols", "vocab_rows", "tokens", "layers", "memory used / budget",
            "compute/layer", "comm/layer")
    rows = [head]
    for d in plan.devices:
        mem = f"{fmt_bytes(d.memory.used_bytes)} / {fmt_bytes(d.memory.budget_bytes)}"
        rows.append((d.name, str(d.heads), str(d.mlp_cols), str(d.vocab_rows), str(d.tokens), str(d.layers), mem,
                     _ms(d.predicted.compute_s), _ms(d.predicted.comm_s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        lines.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if plan.strategies:
        lines.append("strategies (predicted prefill latency)")
        w = max(len(r.strategy) for r in plan.strategies)
        for r in sorted(plan.strategies, key=lambda r: (r.latency_s is None, r.latency_s or 0.0)):
            mark = "*" if r.strategy == plan.strategy else " "
            lat = _ms(r.latency_s) if r.latency_s is not None else "infeasible"
            lines.append(f" {mark}{r.strategy.ljust(w)}  {lat:>11}  {r.reason}")
    for name, why in plan.unused:
        lines.append(f"unused    {name}: {why}")
    if plan.reason:
        lines.append(f"why       {plan.reason}")
    if plan.solver is not None:
        lines.append(f"solved    {solve_line(plan)}")
    return "\n".join(lines)


def solve_line(plan: Plan) -> str:
    """How the plan was found, e.g. "heuristic search over 16 devices in 0.412 s" ("" if not recorded)."""
    sv = plan.solver
    if sv is None:
        return ""
    over = f" over {sv.devices} devices" if sv.devices else ""
    return f"{sv.method} search{over} in {sv.seconds:.3g} s"


def draw(plan: Plan, path) -> Path:
    """Write a chart of the plan: per-device compute vs comm per layer, memory used vs budget,
    and the strategies' predicted latencies. The format follows the suffix (.svg or .png)."""
    path = Path(path)
    if path.suffix.lower() not in (".svg", ".png"):
        raise PlanError(f"draw: {path.name} must end in .svg or .png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d.name for d in plan.devices]
    x = range(len(names))
    fig, (ax_t, ax_m, ax_s) = plt.subplots(1, 3, figsize=(15, 4.5))
    comp = [d.predicted.compute_s * 1e3 for d in plan.devices]
    comm = [d.predicted.comm_s * 1e3 for d in plan.devices]
    ax_t.bar(x, comp, label="compute", color="#4c72b0")
    ax_t.bar(x, comm, bottom=comp, label="comm not hidden / waiting", color="#dd8452")
    ax_t.set_xticks(list(x), names, rotation=30, ha="right")
    ax_t.set_ylabel("ms per layer")
    ax_t.set_title(f"{plan.strategy}: predicted time per layer")
    ax_t.legend(fontsize=8)

    gib = 2**30
    w = [d.memory.weights_bytes / gib for d in plan.devices]
    a = [d.memory.activation_bytes / gib for d in plan.devices]
    ax_m.bar(x, w, label="weights", color="#55a868")
    ax_m.bar(x, a, bottom=w, label="activations", color="#c44e52")
    ax_m.scatter(list(x), [d.memory.budget_bytes / gib for d in plan.devices], marker="_", s=600, color="black",
                 label="budget", zorder=3)
    ax_m.set_xticks(list(x), names, rotation=30, ha="right")
    ax_m.set_ylabel("GiB")
    ax_m.set_title("memory used vs budget")
    ax_m.legend(fontsize=8)

    res = sorted(plan.strategies, key=lambda r: (r.latency_s is None, r.latency_s or 0.0))
    feasible = [r for r in res if r.latency_s is not None]
    ys = range(len(res))
    ax_s.barh(list(ys), [r.latency_s or 0.0 for r in res],
              color=["#4c72b0" if r.strategy == plan.strategy else "#8c8c8c" for r in res])
    top = max((r.latency_s for r in feasible), default=1.0)
    for y, r in zip(ys, res):
        ax_s.text((r.latency_s or 0.0) + top * 0.01, y, "infeasible" if r.latency_s is None else f"{r.latency_s:.3g} s",
                  va="center", fontsize=8)
    ax_s.set_yticks(list(ys), [r.strategy for r in res])
    ax_s.invert_yaxis()
    ax_s.set_xlim(0, top * 1.25)
    ax_s.set_xlabel("predicted prefill latency (s)")
    ax_s.set_title("strategies")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
