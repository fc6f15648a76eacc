"""What the command line refuses or decides before any worker starts: conflicting device options,
output files it could not write, out-of-range generation options, a memory budget no split can
meet; and which devices a plan file runs on."""

from __future__ import annotations

import json

import pytest

from galaxy.cli import build_parser, main
from galaxy.model.config import preset
from planner.profile import ClusterProfile, ComputeModel, DeviceProfile, Link
from planner.solver import solve

CLUSTER_COMMANDS = ["run", "plan", "bench", "chat", "serve"]


def _parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


class _NoWorkers(Exception):
    pass


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test's command at the point it would start or reach workers; record how it tried."""
    calls = []

    def connect(*args, **kwargs):
        calls.append(kwargs)
        raise _NoWorkers

    monkeypatch.setattr("galaxy.cli.session.connect", connect)
    return calls


@pytest.mark.parametrize("command", CLUSTER_COMMANDS)
def test_device_options_are_exclusive_in_every_command(command, capsys):
    err = _parse_error(capsys, [command, "--local", "2", "--workers", "127.0.0.1:5"])
    assert "argument --workers: not allowed with argument --local" in err
    err = _parse_error(capsys, [command, "--cluster", "x.yaml", "--local", "2"])
    assert "not allowed with argument --cluster" in err


@pytest.mark.parametrize("argv", [["run", "--save-output", "no/such/dir/out.npy"],
                                  ["plan", "-o", "no/such/dir/plan.json"], ["plan", "--png", "no/such/dir/p.png"],
                                  ["plan", "--svg", "no/such/dir/p.svg"], ["bench", "--plot", "no/such/dir/b.png"]])
def test_output_into_a_missing_directory_is_refused_when_parsed(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _parse_error(capsys, argv)
    assert "the directory no/such/dir does not exist (create it with `mkdir -p no/such/dir`)" in err


def test_output_that_is_a_directory_is_refused(capsys, tmp_path):
    assert f"{tmp_path} is a directory" in _parse_error(capsys, ["run", "--save-output", str(tmp_path)])


@pytest.mark.parametrize("argv,message", [
    (["run", "--max-new-tokens", "-1"], "-1 is below the minimum, 1 (leave the option out for one forward pass)"),
    (["run", "--max-new-tokens", "0"], "0 is below the minimum, 1 (leave the option out for one forward pass)"),
    (["chat", "--max-new-tokens", "0"], "0 is below the minimum, 1"),
    (["run", "--top-p", "0"], "argument --top-p: 0 is outside (0, 1]"),
    (["run", "--temperature", "-0.5"], "argument --temperature: -0.5 must be >= 0"),
    (["run", "--top-k", "-1"], "argument --top-k: -1 is below the minimum, 0"),
    (["run", "--local", "0"], "argument --local: 0 is below the minimum, 1"),
    (["run", "--tiles", "0"], "argument --tiles: 0 is below the minimum, 1"),
    (["bench", "serve", "--kv-blocks", "0"], "argument --kv-blocks: 0 is below the minimum, 1"),
])
def test_out_of_range_options_are_refused_when_parsed(argv, message, capsys):
    assert message in _parse_error(capsys, argv)


@pytest.mark.parametrize("extra,message", [
    (["--stop", ""], "every stop string must be non-empty"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000: the prompt takes 4 of the model's 128 positions; at "
                                     "most 124 new tokens fit"),
    (["--max-new-tokens", "4", "--temperature", "0.5", "--check"], "--check compares greedy tokens"),
])
def test_generation_options_are_checked_before_workers_start(extra, message, no_workers, capsys):
    argv = ["run", "--random-init", "tiny-gpt2", "--input-ids", "1,2,3,4", "--max-new-tokens", "4", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not no_workers


def test_memory_budget_below_the_models_weights_is_refused_with_numbers_that_add_up(no_workers, capsys):
    assert main(["plan", "--random-init", "gpt2", "--memory-budget", "10MB"]) == 2
    err = capsys.readouterr().err
    assert ("--memory-budget 9.5 MiB per device is too small for gpt2: its weights alone are 474.7 MiB, and 3 devices "
            "x 9.5 MiB = 28.6 MiB hold 6.0% of them; give each device at least 158.2 MiB") in err
    assert not no_workers  # refused before profiling anything


def test_plan_on_a_synthetic_cluster_solves_without_workers_and_records_the_search(no_workers, capsys):
    assert main(["plan", "--synthetic", "16", "--seed", "2", "--random-init", "gpt2", "--seq-len", "64", "--json"]) == 0
    solver = json.loads(capsys.readouterr().out)["solver"]
    assert solver["method"] == "heuristic" and solver["devices"] == 16 and solver["seconds"] > 0
    assert not no_workers
    assert main(["plan", "--synthetic", "5", "--random-init", "gpt2", "--seq-len", "64", "--method", "exact"]) == 0
    assert "solved    exact search over 5 devices in" in capsys.readouterr().out


def test_synthetic_and_real_devices_are_not_mixed(no_workers, capsys):
    assert main(["plan", "--synthetic", "4", "--local", "2", "--random-init", "gpt2"]) == 2
    assert "leave out --local" in capsys.readouterr().err and not no_workers


def _plan_file(tmp_path, addresses) -> str:
    cfg = preset("tiny-gpt2")
    cm = ComputeModel(1e9, 0.0)
    devices = [DeviceProfile(f"d{i}", a, cm, cm, cm, 1 << 30) for i, a in enumerate(addresses)]
    links = [[None if i == j else Link(1e9, 1e-4) for j in range(len(addresses))] for i in range(len(addresses))]
    plan = solve(cfg, 16, ClusterProfile(devices, links), strategy="galaxy")
    assert plan.addresses() == list(addresses)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return str(path)


def test_a_plan_for_lan_devices_runs_on_them(tmp_path, no_workers):
    plan = _plan_file(tmp_path, ["192.168.1.20:50051", "192.168.1.21:50051"])
    with pytest.raises(_NoWorkers):
        main(["run", "--random-init", "tiny-gpt2", "--seq-len", "8", "--plan", plan])
    assert no_workers[0]["addresses"] == ["192.168.1.20:50051", "192.168.1.21:50051"]


def test_a_plan_made_on_local_workers_starts_new_ones(tmp_path, no_workers):
    plan = _plan_file(tmp_path, ["127.0.0.1:41001", "127.0.0.1:41002"])
    with pytest.raises(_NoWorkers):
        main(["run", "--random-init", "tiny-gpt2", "--seq-len", "8", "--plan", plan])
    assert no_workers[0]["local"] == 2 and "addresses" not in no_workers[0]


def test_local_count_other_than_the_plans_is_refused(tmp_path, no_workers, capsys):
    plan = _plan_file(tmp_path, ["192.168.1.20:50051", "192.168.1.21:50051"])
    assert main(["run", "--random-init", "tiny-gpt2", "--seq-len", "8", "--plan", plan, "--local", "3"]) == 2
    assert "--local 3, but" in capsys.readouterr().err and not no_workers


@pytest.mark.parametrize("extra,templated", [(["--max-new-tokens", "4"], True), (["--max-new-tokens", "4", "--raw"],
                                             False), ([], False)])
def test_run_sends_a_chat_models_prompt_through_its_template_when_generating(extra, templated, smollm2_path,
                                                                             no_workers, capsys):
    with pytest.raises(_NoWorkers):
        main(["run", "--prompt", "Hello", *extra])
    assert ("the prompt goes in as a user message, through its chat template" in capsys.readouterr().err) == templated


def test_a_one_token_run_prints_no_decode_figures(capsys):
    argv = ["run", "--transport", "inproc", "--local", "1", "--random-init", "tiny-gpt2", "--input-ids", "1,2,3",
            "--max-new-tokens", "1"]
    assert main(argv) == 0
    summary = capsys.readouterr().err.splitlines()[-1]
    assert summary.startswith("galaxy: 1 tokens (length); time to first token") and "None" not in summary
    assert "ms/token" not in summary


def test_plan_serve_places_the_phases_on_a_synthetic_cluster_and_records_it(no_workers, capsys, tmp_path):
    out = tmp_path / "plan.json"
    argv = ["plan", "--serve", "--synthetic", "3", "--random-init", "smollm2-135m", "--seq-len", "64",
            "--output-len", "8", "--rate", "0.5", "--sim-requests", "20", "--tpot-slo", "2x", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "colocated" in text and "goodput" in text and "chosen: " in text and "prefill plan:" in text
    serve = json.loads(out.read_text())["serve"]
    assert serve["placement"] in ("colocated", "disaggregated", "mixed") and serve["workload"]["input_len"] == 64
    assert serve["predicted"]["goodput_rps"] >= 0 and not no_workers


def test_plan_serve_chooses_each_groups_strategy_itself(no_workers, capsys):
    assert main(["plan", "--serve", "--synthetic", "3", "--random-init", "smollm2-135m", "--strategy", "galaxy"]) == 2
    assert "leave out --strategy" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "fast", "0x"])
def test_plan_serve_objectives_are_checked_when_parsed(value, capsys):
    assert "objective" in _parse_error(capsys, ["plan", "--serve", "--ttft-slo", value])


def test_kv_blocks_sizes_the_engines_pool_in_serve_and_bench_serve():
    """A second session on the same workers (the phase bench's colocated baseline) needs a pool size
    of its own: the default fills the memory budget as if the session were alone."""
    from galaxy.cli.serve import engine_config

    for argv in (["serve", "--kv-blocks", "96"], ["bench", "serve", "--kv-blocks", "96"]):
        assert engine_config(build_parser().parse_args(argv)).kv_blocks == 96
    assert engine_config(build_parser().parse_args(["serve"])).kv_blocks is None


@pytest.fixture
def saved_profile(tmp_path, no_workers):
    from planner.synthetic import synthetic_cluster

    path = tmp_path / "profile.json"
    path.write_text(synthetic_cluster(3, 1).to_json())  # as --profile-out writes it, less the model's shape
    return path


def test_profile_in_caps_every_device_by_the_memory_budget(saved_profile, monkeypatch):
    import galaxy.cli.plan as plan_cli

    real, memories = plan_cli.fit_plan, []

    def fit_plan(cfg, seq, cluster, *args, **kwargs):
        memories.extend(d.memory_bytes for d in cluster.devices)
        return real(cfg, seq, cluster, *args, **kwargs)

    monkeypatch.setattr(plan_cli, "fit_plan", fit_plan)
    saved = [d.memory_bytes for d in ClusterProfile.from_json(saved_profile.read_text()).devices]
    budget = min(saved) - 1
    assert main(["plan", "--random-init", "gpt2", "--seq-len", "64", "--profile-in", str(saved_profile),
                 "--memory-budget", str(budget)]) == 0
    assert memories == [budget] * 3


@pytest.mark.parametrize("extra, given", [(["--synthetic", "3"], "--synthetic"), (["--local", "2"], "--local"),
                                          (["--reprofile"], "--reprofile")])
def test_profile_in_refuses_device_options_it_would_ignore(saved_profile, extra, given, capsys):
    assert main(["plan", "--random-init", "gpt2", "--profile-in", str(saved_profile), *extra]) == 2
    assert f"--profile-in plans on a saved profile, not on devices; leave out {given}" in capsys.readouterr().err


@pytest.mark.parametrize("text, what", [('{"devices": [{"name": "a"}]}', "missing field 'address'"),
                                        ("[1, 2]", "expected a JSON object with a list of devices"),
                                        ("{", "Expecting property name")])
def test_a_malformed_profile_in_is_refused_naming_the_file_and_what_is_wrong(tmp_path, no_workers, text, what,
                                                                           capsys):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["plan", "--random-init", "gpt2", "--profile-in", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--profile-in {path}: not a profile written by --profile-out" in err and what in err


def test_profile_out_records_the_model_shape_and_a_profile_in_of_another_is_refused(tmp_path, no_workers, capsys):
    path = tmp_path / "profile.json"
    assert main(["plan", "--synthetic", "3", "--seed", "1", "--random-init", "gpt2", "--seq-len", "64",
                 "--profile-out", str(path)]) == 0
    assert json.loads(path.read_text())["shape"]["hidden"] == preset("gpt2").hidden
    capsys.readouterr()
    assert main(["plan", "--random-init", "tiny-gpt2", "--seq-len", "64", "--profile-in", str(path)]) == 2
    assert "profiled for another model shape (hidden 768 there" in capsys.readouterr().err
