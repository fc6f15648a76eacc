"""A process that called MKL before importing galaxy cannot get MKL's strict mode (model/numerics.py): a
shard loaded there in a format with bf16 activations says so once, instead of silently giving a sequence
other tokens in a batch than alone."""

from __future__ import annotations

import logging

import pytest

from galaxy.model import numerics
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import make_config
from galaxy.model.quant import parse_format
from galaxy.parallel.compact import compact_shard
from galaxy.parallel.sharding import full_spec, load_shard

CFG = make_config("llama", vocab_size=97, hidden=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn=96,
                  max_positions=64, rope_theta=10000.0, name="mkl-warning-llama")
SRC = RandomWeights(CFG, seed=3)


def _load(fmt: str) -> None:
    compact_shard(load_shard(SRC, full_spec(CFG)), SRC, parse_format(fmt))


@pytest.mark.parametrize("strict,formats,warnings", [
    (False, ("int8", "int8"), 1),  # once a process
    (False, ("fp32", "int4-fp32"), 0),  # float activations: no bits promised
    (True, ("int8",), 0),
    (None, ("int8",), 0),  # no MKL to ask
])
def test_a_bf16_activation_shard_warns_once_when_mkl_is_not_strict(monkeypatch, caplog, strict, formats, warnings):
    monkeypatch.setattr(numerics, "strict_mkl", lambda: strict)
    monkeypatch.setattr(numerics, "_warned", [])
    with caplog.at_level(logging.WARNING, logger=numerics.__name__):
        for fmt in formats:
            _load(fmt)
    said = [r for r in caplog.records if "strict reproducibility" in r.getMessage()]
    assert len(said) == warnings
    assert all("weights format int8" in r.getMessage() for r in said)
