"""Re-balancing a split from measured busy times moves work toward the device that showed itself
faster -- judged by each device's share of the GEMM work, not by the plan's token counts."""

from __future__ import annotations

import torch

from galaxy.bench import strategies as bench
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset
from galaxy.parallel.forward import Request
from galaxy.parallel.sharding import Partition
from galaxy.transport.spawn import LocalWorkers


def test_calibration_moves_work_off_the_overloaded_device():
    src = RandomWeights(preset("gpt2").replace(n_layers=2), seed=3)
    cfg = src.config
    # the planner's shape of partition: a lopsided compute split, token counts as seq_weights
    skewed = Partition("galaxy", (10, 2), (2560, 512), (25000, cfg.vocab_size - 25000), (2, 2), (128.0, 128.0))
    req = Request(torch.arange(256), last_only=True)  # a prefill: the LM head runs for one token
    with LocalWorkers(2, threads=1) as addrs:  # separate processes: busy times are each device's own
        ld = bench._Loaded(bench.Placement("galaxy", [0, 1], skewed.validate(cfg)), addrs, None, None, src, 1)
        try:
            ld.load()
            note = bench.calibrate(ld, req, rounds=1)
            before, after = skewed.work_shares(cfg), ld.layout.partition.work_shares(cfg)
            assert note.startswith("calibrated on the devices")
            assert before[0] > 0.8 and after[0] < before[0] - 0.05, (before, after)  # toward even
            assert ld.forward(req).output.shape[0] == 1  # the new split loads and runs
        finally:
            ld.release()
            ld.close()
