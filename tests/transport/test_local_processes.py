"""Real worker processes: `galaxy run --local 3` end to end, and nothing leaks, pass or fail."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from galaxy.cli import main
from galaxy.errors import GalaxyError
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.executor import LoadOptions
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import even_partition, full_spec, load_shard, weighted_partition
from galaxy.transport.client import Cluster, ModelRef
from galaxy.transport.spawn import LocalWorkers

TOL = 1e-4  # fp32 max abs error against the single-device reference


def _galaxy(capsys, *args) -> tuple[int, str, str]:
    """`galaxy ARGS` run by the command's main() in this process: its exit code, stdout and stderr. The
    workers it starts are still processes of their own; only the coordinator's start (~2.5 s of Python
    and torch imports per command on the shared two-core machine) is not paid again."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _port_free(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


@pytest.mark.parametrize("strategy", ["galaxy", "megatron", "pipeline"])
def test_cli_run_local_3_default_model_matches_reference(strategy, smollm2_path, capsys):
    code, out, err = _galaxy(capsys, "run", "--local", "3", "--check", "--json", "--strategy", strategy)
    assert code == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["check"] == "pass" and rep["max_abs_err"] <= TOL
    assert rep["top5"][0]["text"] == " Paris"
    assert rep["devices"] == 3 and len(rep["per_device"]) == 3


def test_gpt2_large_shape_every_strategy_on_worker_processes():
    cfg = preset("gpt2-large").replace(n_layers=6)  # real layer shape, fewer layers for CI time
    src = RandomWeights(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    want = load_shard(src, full_spec(cfg))(ids)
    with LocalWorkers(3, threads=1) as addrs, Cluster(addrs) as c:
        for p in (weighted_partition(cfg, [0.9, 0.6, 0.45]), even_partition(cfg, 3, "megatron"),
                  even_partition(cfg, 3, "pipeline")):
            c.load_ref(ModelRef(cfg, random_init=True, seed=5), p, LoadOptions(tiles=2))
            err = (c.forward(Request(ids)).output - want).abs().max().item()
            assert err <= TOL, f"{p.strategy}: {err}"


def test_local_workers_release_processes_and_ports():
    me = psutil.Process()
    with LocalWorkers(2) as addrs:
        pids = [c.pid for c in me.children()]
        assert len(pids) == 2 and not any(_port_free(a) for a in addrs)
    assert not me.children()
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)
    assert all(_port_free(a) for a in addrs)


def test_cleanup_happens_when_the_body_fails():
    me = psutil.Process()
    with pytest.raises(RuntimeError), LocalWorkers(2):
        raise RuntimeError("test body failed")
    assert not me.children()


def test_killed_worker_is_reported_by_name_and_the_rest_still_stop():
    cfg = preset("tiny-llama")
    workers = LocalWorkers(3)
    with workers as addrs, Cluster(addrs, forward_timeout=60) as c:
        c.hello()
        c.load_ref(ModelRef(cfg, random_init=True), even_partition(cfg, 3), recv_timeout=30)
        os.kill(workers.procs[2].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(GalaxyError, match="local2"):
            c.forward(Request(torch.arange(9)))
        assert time.monotonic() - t0 < 20
    assert not psutil.Process().children()


def test_workers_exit_when_their_coordinator_is_killed(tmp_path):
    script = (
        "import sys, time\n"
        "from galaxy.transport.spawn import LocalWorkers\n"
        "w = LocalWorkers(2); w.start()\n"
        "print(' '.join(str(p.pid) for p in w.procs), flush=True)\n"
        "time.sleep(600)\n"
    )
    coord = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in coord.stdout.readline().split()]
        assert len(pids) == 2
        coord.kill()
        coord.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.2)
        assert not any(psutil.pid_exists(p) for p in pids)
    finally:
        coord.kill()
        coord.stdout.close()


def test_cli_generation_tokens_match_reference(smollm2_path, capsys):
    code, out, err = _galaxy(capsys, "run", "--local", "3", "--prompt", "What is the capital of France?",
                             "--max-new-tokens", "16", "--check", "--json")
    assert code == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["chat_template"] is True and rep["tokens_match"] is True and "Paris" in rep["text"]
    assert rep["decode_collective"] == "direct all-reduce (1 hop)" and len(rep["kv_cache_bytes"]) == 3


@pytest.mark.parametrize("model", ["smollm2", "minilm"])
def test_cli_onnx_backend_matches_torch_reference(model, smollm2_path, minilm_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the workers' exported graphs: exported here, not reused
    code, out, err = _galaxy(capsys, "run", "--local", "3", "--backend", "onnx", "--model", model, "--check", "--json")
    assert code == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["backend"] == ["onnx"] * 3 and rep["check"] == "pass" and rep["max_abs_err"] <= TOL
