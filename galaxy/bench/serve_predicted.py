"""`galaxy bench serve --plan PLAN.json`: what `galaxy plan --serve` predicted, next to what was measured.

The planner chooses a placement by simulating the engine (planner/simulate.py) and writes its
prediction into the plan's `serve.predicted`: the unloaded TTFT and TPOT, TTFT and TPOT P50/P90 and
the share of requests meeting both objectives at the planned rate, and goodput -- the highest
Poisson rate at which >= 90% do. The bench measures the same quantities on the same objectives
(the plan's, in seconds), so each row is a prediction, a measurement and their ratio
(measured / predicted; the issue's goal for goodput: within 20%).

Measured goodput is read off the bench's sweep (`--rates`) as the planner defines it: the highest
swept rate at which >= 90% of requests met both objectives, with the first swept rate above it that
did not, so the resolution of the sweep is part of the figure. Only the `batch` scheduler (the
engine the plan's placement runs) is compared; at-rate rows need a run at the plan's rate.
"""

from __future__ import annotations

import math

ATTAINMENT_GOAL = 0.9  # as planner/simulate.py and galaxy/bench/serve.py


def measured_goodput(runs: list[dict], scheduler: str = "batch") -> dict:
    """The highest swept rate with >= 90% attainment, and the lowest swept rate above it that missed
    (None: none above it was swept). 0 when even the lowest swept rate missed."""
    swept = sorted((r["rate"], r["slo_attainment"]) for r in runs
                   if r["scheduler"] == scheduler and not r["concurrency"] and math.isfinite(r["rate"]))
    best = max((rate for rate, att in swept if att >= ATTAINMENT_GOAL), default=0.0)
    above = [rate for rate, att in swept if rate > best and att < ATTAINMENT_GOAL]
    return {"goodput_rps": best, "next_missed_rps": min(above) if above else None,
            "swept_rps": [rate for rate, _ in swept]}


def compare(report: dict, serve, plan_path: str = "") -> dict:
    """Rows of (predicted, measured, ratio) from a plan's serve section (planner.plan.ServePlan) and
    a `run_serve_bench` report measured on its objectives."""
    p = serve.predicted
    at = next((r for r in report["runs"] if r["scheduler"] == "batch" and not r["concurrency"]
               and math.isclose(r["rate"], serve.rate, rel_tol=1e-9)), None)
    good = measured_goodput(report["runs"])

    def stat(key: str, q: str):
        return None if at is None else at[key][q]

    rows = {
        "unloaded_ttft_s": (p.unloaded_ttft_s, report["unloaded"]["ttft_s"]),
        "unloaded_tpot_s": (p.unloaded_tpot_s, report["unloaded"]["tpot_s"]),
        "ttft_p50_s": (p.ttft_p50_s, stat("ttft_s", "median")),
        "ttft_p90_s": (p.ttft_p90_s, stat("ttft_s", "p90")),
        "tpot_p50_s": (p.tpot_p50_s, stat("tpot_s", "median")),
        "tpot_p90_s": (p.tpot_p90_s, stat("tpot_s", "p90")),
        "attainment": (p.attainment, None if at is None else at["slo_attainment"]),
        "goodput_rps": (p.goodput_rps, good["goodput_rps"]),
    }
    w = report["workload"]
    notes = []
    if (w["input_len"], w["output_len"]) != (serve.input_len, serve.output_len):
        notes.append(f"the plan predicted {serve.input_len} + {serve.output_len} tokens per request, the bench ran "
                     f"{w['input_len']} + {w['output_len']}")
    if at is None:
        notes.append(f"no batch run at the plan's rate {serve.rate:g} req/s: add it to --rates")
    return {"plan": plan_path, "placement": serve.placement, "rate": serve.rate,
            "objectives": {"ttft_s": serve.ttft_slo_s, "tpot_s": serve.tpot_slo_s},
            "rows": {k: {"predicted": pr, "measured": me,
                         "ratio": me / pr if pr and me is not None else None} for k, (pr, me) in rows.items()},
            "goodput_sweep": good, "notes": notes}


def _value(key: str, x) -> str:
    if x is None:
        return "-"
    if key == "attainment":
        return f"{100 * x:.0f}%"
    return f"{x:.3g}" if key == "goodput_rps" else f"{1e3 * x:.3g}"


LABELS = {"unloaded_ttft_s": "unloaded TTFT ms", "unloaded_tpot_s": "unloaded TPOT ms",
          "ttft_p50_s": "TTFT p50 ms", "ttft_p90_s": "TTFT p90 ms", "tpot_p50_s": "TPOT p50 ms",
          "tpot_p90_s": "TPOT p90 ms", "attainment": "SLO met", "goodput_rps": "goodput req/s"}


def table(cmp: dict) -> str:
    o = cmp["objectives"]
    lines = ["", f"predicted ({cmp['plan'] or 'the plan'}: {cmp['placement']}, objectives TTFT <= "
             f"{1e3 * o['ttft_s']:.3g} ms, TPOT <= {1e3 * o['tpot_s']:.3g} ms) against measured (batch):", "",
             "| quantity | predicted | measured | measured / predicted |", "|---|---|---|---|"]
    for key, row in cmp["rows"].items():
        label = LABELS[key] + (f" @{cmp['rate']:g}/s" if key.startswith(("ttft_p", "tpot_p", "attain")) else "")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {label} | {_value(key, row['predicted'])} | {_value(key, row['measured'])} | {ratio} |")
    g = cmp["goodput_sweep"]
    nxt = "none swept above it" if g["next_missed_rps"] is None else f"{g['next_missed_rps']:g} req/s missed"
    lines.append(f"measured goodput: the highest of the swept rates {', '.join(f'{r:g}' for r in g['swept_rps'])} "
                 f"req/s with >= 90% meeting both objectives ({nxt})")
    lines += [f"note: {n}" for n in cmp["notes"]]
    return "\n".join(lines)
