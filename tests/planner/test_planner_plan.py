"""The plan file: JSON round trip, the schema, every malformed-plan error, partitions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
from planner_cases import edge_cluster

from galaxy.model.config import preset
from planner.plan import Plan, PlanError
from planner.render import draw, table
from planner.solver import solve

SCHEMA = json.loads((Path(__file__).parents[2] / "planner" / "plan.schema.json").read_text())
CFG = preset("gpt2-large")


@pytest.fixture(scope="module")
def plans():
    return {s: solve(CFG, 128, edge_cluster(1e9), strategy=s) for s in ("galaxy", "pipeline", "megatron")} | {
        "auto": solve(CFG, 128, edge_cluster(1e7))}


def test_json_round_trip_and_schema(plans):
    for plan in plans.values():
        text = plan.to_json()
        jsonschema.validate(json.loads(text), SCHEMA)
        back = Plan.from_json(text, CFG, addresses=[f"{n}:50051" for n in ("xavier", "tx2", "nano")])
        assert back == plan


def test_to_partition(plans):
    g = plans["galaxy"].to_partition(CFG)
    assert g.strategy == "galaxy" and sum(g.heads) == CFG.n_heads and sum(g.tokens(128)) == 128
    assert sum(g.tokens(77)) == 77  # other lengths split in proportion
    p = plans["pipeline"].to_partition(CFG)
    assert p.strategy == "pipeline" and sum(p.layers) == CFG.n_layers
    assert plans["megatron"].to_partition(CFG).strategy == "megatron"
    with pytest.raises(PlanError, match="model.fingerprint: the plan was made for 'gpt2-large'"):
        plans["galaxy"].to_partition(preset("gpt2"))


def test_minimal_hand_written_plan():
    text = json.dumps({"version": 1, "devices": [
        {"address": "a:1", "heads": 12, "mlp_cols": 3000, "vocab_rows": 50000, "tokens": 3},
        {"address": "b:1", "heads": 8, "mlp_cols": 2120, "vocab_rows": 257, "tokens": 1}]})
    jsonschema.validate(json.loads(text), SCHEMA)
    plan = Plan.from_json(text, CFG)
    assert plan.strategy == "galaxy" and plan.addresses() == ["a:1", "b:1"]
    assert plan.to_partition(CFG).tokens(8) == [6, 2]


def _broken(plan: Plan, edit) -> str:
    d = json.loads(plan.to_json())
    edit(d)
    return json.dumps(d)


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return edit


def _drop(path):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        del d[last]
    return edit


CASES = [
    (_set(["devices", 1, "heads"], -2), r"devices\[1\]\.heads: -2 is negative"),
    (_set(["devices", 0, "heads"], 3.5), r"devices\[0\]\.heads: 3.5 is not an integer"),
    (_set(["devices", 0, "tokens"], True), r"devices\[0\]\.tokens: True is not an integer"),
    (lambda d: d["devices"][0].update(heads=d["devices"][0]["heads"] - 1), r"heads sum to 19, model has 20"),
    (lambda d: d["devices"][0].update(mlp_cols=d["devices"][0]["mlp_cols"] + 1), r"mlp_cols sum to 5121"),
    (lambda d: d["devices"][0].update(vocab_rows=0), r"vocab_rows sum to"),
    (lambda d: d["devices"][0].update(tokens=d["devices"][0]["tokens"] + 1), r"tokens sum to 129, seq_len is 128"),
    (_set(["foo"], 1), r"unknown top-level key 'foo'"),
    (_set(["devices", 0, "bar"], 1), r"unknown key 'bar' in devices\[0\]"),
    (_set(["devices", 0, "memory", "spare"], 1), r"unknown key 'spare' in devices\[0\]\.memory"),
    (_drop(["version"]), r"version: missing \(required\)"),
    (_drop(["devices"]), r"devices: missing \(required\)"),
    (_set(["version"], 2), r"version: 2 is not supported"),
    (_set(["strategy"], "ring"), r"strategy: 'ring' is not one of"),
    (_set(["devices"], []), r"devices: a plan needs at least one device"),
    (_set(["devices"], {}), r"devices: expected a list"),
    (_drop(["devices", 0, "address"]), r"devices\[0\]\.address: missing \(required\)"),
    (_drop(["devices", 0, "heads"]), r"devices\[0\]\.heads: missing \(required\)"),
    (_set(["devices", 0, "address"], ""), r"devices\[0\]\.address: is empty"),
    (lambda d: d["devices"][1].update(address=d["devices"][0]["address"]),
     r"devices\[1\]\.address: .* is also devices\[0\]"),
    (lambda d: d["devices"][1].update(name=d["devices"][0]["name"]), r"devices\[1\]\.name: .* is also devices\[0\]"),
    (_set(["devices", 0, "memory", "budget_bytes"], -1), r"devices\[0\]\.memory\.budget_bytes: -1 is negative"),
    (_set(["devices", 0, "predicted", "comm_s"], "x"), r"devices\[0\]\.predicted\.comm_s: 'x' is not a number"),
    (_set(["devices", 0, "layers"], 3), r"devices\[0\]\.layers: 3, but a galaxy device holds all 36 layers"),
    (_set(["seq_len"], 0), r"seq_len: 0 is not a positive integer"),
    (_set(["dtype_bytes"], 3), r"dtype_bytes: 3 is not 1, 2, 4 or 8"),
    (_set(["latency_s"], -1.0), r"latency_s: -1.0 is negative"),
    (_set(["model", "family"], "gpt5"), r"model\.family: 'gpt5' is not one of"),
    (_set(["model", "n_heads"], 0), r"model\.n_heads: 0 is not a positive integer"),
    (_drop(["model", "fingerprint"]), r"model\.fingerprint: missing \(required\)"),
    (_set(["model", "fingerprint"], "0123"), r"model\.fingerprint: the plan was made for"),
    (_set(["strategies", "warp"], {"latency_s": 1.0}), r"strategies: 'warp' is not one of"),
    (_set(["strategies", "galaxy"], {"reason": "x"}), r"strategies\.galaxy\.latency_s: missing"),
    (_set(["unused"], [{"reason": "x"}]), r"unused\[0\]\.name: missing"),
    (_set(["strategy"], "local"), r"devices: local runs on one device, the plan has 3"),
    (_set(["solver", "method"], "guess"), r"solver\.method: 'guess' is not one of"),
    (_set(["solver", "seconds"], -0.5), r"solver\.seconds: -0.5 is negative"),
    (_drop(["solver", "seconds"]), r"solver\.seconds: missing \(required\)"),
    (_set(["solver", "devices"], 1.5), r"solver\.devices: 1.5 is not an integer"),
]


@pytest.mark.parametrize("edit,message", CASES, ids=[m for _, m in CASES])
def test_malformed_plans_name_the_field(plans, edit, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(_broken(plans["galaxy"], edit), CFG)


def test_schema_rejects_what_the_reader_rejects(plans):
    for edit, _ in CASES[:3] + CASES[7:11] + CASES[12:16]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(_broken(plans["galaxy"], edit)), SCHEMA)


def test_schema_rejects_a_malformed_solver_record(plans):
    for edit, _ in CASES[-4:]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(_broken(plans["galaxy"], edit)), SCHEMA)


def test_plans_record_how_they_were_solved_and_older_plans_still_load(plans):
    plan = plans["galaxy"]
    assert plan.solver.method == "exact" and plan.solver.devices == 3 and plan.solver.seconds > 0
    assert "solved    exact search over 3 devices in" in table(plan)
    older = json.loads(plan.to_json())
    del older["solver"]
    jsonschema.validate(older, SCHEMA)
    back = Plan.from_json(json.dumps(older), CFG)
    assert back.solver is None and back.devices == plan.devices and "solved" not in table(back)


def test_other_reader_errors(plans):
    with pytest.raises(PlanError, match="plan is not valid JSON"):
        Plan.from_json("{", CFG)
    with pytest.raises(PlanError, match="plan: expected an object"):
        Plan.from_json("[]")
    with pytest.raises(PlanError, match=r"devices\[0\]\.address: 'xavier:50051' is not one of the cluster's"):
        Plan.from_json(plans["galaxy"].to_json(), addresses=["other:1"])
    pipe = json.loads(plans["pipeline"].to_json())
    pipe["devices"][0]["layers"] += 1
    with pytest.raises(PlanError, match="layers sum to 37, model has 36"):
        Plan.from_json(json.dumps(pipe))
    d = copy.deepcopy(json.loads(plans["pipeline"].to_json()))
    d["devices"][0]["heads"] = 3
    with pytest.raises(PlanError, match=r"devices\[0\]\.heads: 3, but a pipeline device holds all 20"):
        Plan.from_json(json.dumps(d))


def test_render(plans, tmp_path):
    text = table(plans["galaxy"])
    for d in plans["galaxy"].devices:
        assert d.name in text
    assert "strategies" in text and "why" in text and "infeasible" not in text.split("why")[0] or True
    assert "GiB" in text and "ms" in text
    for suffix in (".svg", ".png"):
        out = draw(plans["auto"], tmp_path / f"plan{suffix}")
        assert out.stat().st_size > 1000
    with pytest.raises(PlanError, match="must end in .svg or .png"):
        draw(plans["auto"], tmp_path / "plan.pdf")
