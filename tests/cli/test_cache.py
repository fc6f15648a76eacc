"""`galaxy cache ls|clear`: the caches under one root, per kind and device, with sizes; clearing one
kind or one device's entries leaves the rest."""

from __future__ import annotations

import json

import pytest

from galaxy.cli import main
from galaxy.paths import cache_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GALAXY_CACHE", str(tmp_path))
    (cache_dir("shards") / "jetson").mkdir(parents=True)
    (cache_dir("shards") / "jetson" / "abc.safetensors").write_bytes(b"x" * 3000)
    (cache_dir("shards") / "jetson" / "abc.json").write_bytes(b"{}")
    (cache_dir("shards") / "pi5").mkdir()
    (cache_dir("shards") / "pi5" / "def.safetensors").write_bytes(b"x" * 5000)
    cache_dir("profiles").mkdir()
    (cache_dir("profiles") / "jetson-0123456789abcdef.json").write_bytes(b"y" * 100)
    (cache_dir("profiles") / "pi5-fedcba9876543210.json").write_bytes(b"y" * 200)
    cache_dir("onnx").mkdir()
    (cache_dir("onnx") / "graph.onnx").write_bytes(b"z" * 700)
    return tmp_path


def _ls(capsys, *args) -> dict[tuple[str, str], tuple[int, int]]:
    assert main(["cache", "ls", "--json", *args]) == 0
    rep = json.loads(capsys.readouterr().out)
    return {(e["kind"], e["device"]): (e["files"], e["bytes"]) for e in rep["entries"]}


def test_ls_shows_every_kind_per_device_with_sizes(cache, capsys):
    assert _ls(capsys) == {("profiles", "jetson"): (1, 100), ("profiles", "pi5"): (1, 200),
                           ("shards", "jetson"): (2, 3002), ("shards", "pi5"): (1, 5000), ("onnx", ""): (1, 700)}
    assert main(["cache", "ls"]) == 0
    table = capsys.readouterr().out
    assert str(cache) in table and "4.9 KiB" in table and "total" in table


def test_clear_one_devices_shards_leaves_the_rest(cache, capsys):
    assert main(["cache", "clear", "--kind", "shards", "--name", "jetson"]) == 0
    assert "removed shards of jetson: 2 files, 2.9 KiB" in capsys.readouterr().out
    assert set(_ls(capsys)) == {("profiles", "jetson"), ("profiles", "pi5"), ("shards", "pi5"), ("onnx", "")}


def test_clear_by_device_name_takes_its_profiles_and_shards(cache, capsys):
    assert main(["cache", "clear", "--name", "pi5"]) == 0
    capsys.readouterr()
    assert set(_ls(capsys)) == {("profiles", "jetson"), ("shards", "jetson"), ("onnx", "")}
    assert main(["cache", "clear"]) == 0
    assert "removed onnx: 1 files" in capsys.readouterr().out
    assert _ls(capsys) == {}


def test_clear_refuses_a_name_that_is_a_path(cache, capsys):
    assert main(["cache", "clear", "--name", "../x"]) == 2
    assert "a device name" in capsys.readouterr().err
