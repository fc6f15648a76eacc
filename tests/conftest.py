"""Shared fixtures: tiny random models of every family, the embedded real models, one intra-op thread,
worker servers in the test process."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import pytest
import torch

# no compiled decode steps in the suite (parallel/decode_graph.py): compiling costs seconds a load; the graphs'
# own test asks for them (subprocesses, the test's `galaxy worker`s, inherit this)
os.environ["GALAXY_DECODE_COMPILE"] = "0"

import galaxy.parallel.rank as rank_module
from galaxy.engine.step_cost import StepCost
from galaxy.model.checkpoints.random import RandomWeights
from galaxy.model.config import preset

TINY = ["tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-opt", "tiny-llama"]


class TileMemo:
    """RandomWeights._tile with each tile kept once drawn (least recently used dropped past `limit`).

    Every 512 x 512 tile of a random model comes from its own seeded generator, and torch's randn makes
    ~35-70 M values a second here: 4-7 ms a tile. A test typically draws each tile of its model twice or
    more -- for the single-device reference and again for every shard whose slice touches it -- and
    many tests rebuild the same preset and seed. The values are the generator's, drawn once: identical
    by construction; only how often they are drawn changes. Only this process's draws are kept: worker
    processes build their shards from their own generators, as on a device."""

    def __init__(self, draw, limit: int):
        self.draw, self.limit = draw, limit
        self.tiles: OrderedDict = OrderedDict()
        self.lock = threading.Lock()  # in-process ranks build their shards on threads
        self.drawn = self.reused = 0

    def __call__(self, source, key: int, bi: int, bj: int, rows: int, cols: int) -> torch.Tensor:
        k = (key, bi, bj, rows, cols)
        with self.lock:
            tile = self.tiles.get(k)
            if tile is not None:
                self.tiles.move_to_end(k)
                self.reused += 1
                return tile
        tile = self.draw(source, key, bi, bj, rows, cols)  # readers copy out of it, never write into it
        with self.lock:
            self.tiles[k] = tile
            self.drawn += 1
            while len(self.tiles) > self.limit:
                self.tiles.popitem(last=False)
        return tile


@pytest.fixture(scope="session", autouse=True)
def random_tiles_drawn_once():
    """At most 256 tiles (256 MiB) kept for the session: more than the largest random model a test
    builds in this process, so its reference and its shards share their draws."""
    memo = TileMemo(RandomWeights._tile, limit=256)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RandomWeights, "_tile", lambda source, *tile: memo(source, *tile))
        yield memo


class GGUFRowsMemo:
    """GGUFCheckpoint._rows for one file (the embedded SmolLM2) with each dequantized row range kept
    (least recently used dropped past `limit_bytes`) and handed out as a copy.

    Dequantizing the file's Q4_1 blocks (the gguf package, numpy) was about a third of the time of the
    modules that load SmolLM2 in process, and they read the same ranges again and again: every
    reference model reads every tensor whole, every shard cut by columns reads it whole too, every even
    split the same rows. The first read of a range runs the ordinary code; a later one gets a copy of
    its result, so the values are identical and a caller may still write into what it got. The file is
    package data, never rewritten; files tests write are read afresh every time."""

    def __init__(self, read, path: str, limit_bytes: int):
        self.read, self.path, self.limit_bytes = read, path, limit_bytes
        self.kept: OrderedDict = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()  # in-process ranks load their shards on threads
        self.read_count = self.reused = 0

    def __call__(self, source, gguf_name: str, start: int, end: int) -> torch.Tensor:
        if source.path != self.path:
            return self.read(source, gguf_name, start, end)
        k = (gguf_name, start, end)
        with self.lock:
            kept = self.kept.get(k)
            if kept is not None:
                self.kept.move_to_end(k)
                self.reused += 1
                return kept.clone()
        out = self.read(source, gguf_name, start, end)
        with self.lock:
            if k not in self.kept:
                self.kept[k] = out.clone()
                self.bytes += out.nbytes
                self.read_count += 1
            while self.bytes > self.limit_bytes and self.kept:
                self.bytes -= self.kept.popitem(last=False)[1].nbytes
        return out


@pytest.fixture(scope="session", autouse=True)
def smollm2_rows_read_once():
    """Up to 1 GiB of the embedded SmolLM2's dequantized rows kept for the session (the whole model
    is 0.5 GiB in float32); None when the model is not installed."""
    from galaxy.model.checkpoints.gguf import GGUFCheckpoint
    from galaxy.model.defaults import DefaultModelMissing, default_causal_lm_path

    try:
        path = str(default_causal_lm_path())
    except DefaultModelMissing:
        yield None
        return
    memo = GGUFRowsMemo(GGUFCheckpoint._rows, path, limit_bytes=1 << 30)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GGUFCheckpoint, "_rows", lambda source, *rows: memo(source, *rows))
        yield memo


@pytest.fixture(scope="session", params=TINY)
def tiny_source(request):
    return RandomWeights(preset(request.param), seed=1)


def _default(getter):
    from galaxy.model.defaults import DefaultModelMissing

    try:
        return getter()
    except DefaultModelMissing as e:
        pytest.skip(f"embedded default model not installed: {e}")


@pytest.fixture(scope="session")
def smollm2_path():
    from galaxy.model.defaults import default_causal_lm_path

    return _default(default_causal_lm_path)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own LlamaForCausalLM of the embedded SmolLM2 GGUF (dequantized, fp32, eval), loaded
    once for the session: the checkpoint tests compare its weights and the reference tests its logits,
    and each load took ~15 s on the shared two-core machine. Read-only: no test may change it."""
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) cross-checks our loader")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def minilm_path():
    from galaxy.model.defaults import default_encoder_path

    return _default(default_encoder_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared two-core machine the
    threads' spin-waits made such modules up to 15x slower (22 s against 1.5 s). Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Servers:
    """Worker servers inside the test process (real gRPC on loopback, no subprocesses), named w0, w1, ...;
    `stop(i)` stops one for good (its port refuses from then on), as a killed worker process would."""

    def __init__(self):
        self.running = []

    def start(self, n: int, token: str | None = None, **settings) -> list[str]:
        from galaxy.transport.worker import WorkerSettings, start_server  # grpc: only for the tests that use it

        addrs = []
        for i in range(n):
            server, addr, service = start_server("127.0.0.1:0", WorkerSettings(name=f"w{i}", token=token, **settings))
            self.running.append((server, service))
            addrs.append(addr)
        return addrs

    def stop(self, index: int | None = None) -> None:
        """Stop the server first, then drop its sessions: as a killed process, its port refuses from the
        first moment on, never answering in between without the sessions it held."""
        for i, (server, service) in enumerate(list(self.running)):
            if index is None or i == index:
                server.stop(grace=0).wait(timeout=10)
                service.close()


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.stop()


@pytest.fixture
def step_threads_seen(monkeypatch) -> list[tuple[int, int]]:
    """(tokens, intra-op threads) of every rank pass in this process (in-process ranks and workers), as
    the rank's forward sees them (galaxy.parallel.threads)."""
    seen = []
    inner = rank_module.rank_forward

    def spy(model, comm, partition, p, *graphs):
        seen.append((int(p.ids.numel()), torch.get_num_threads()))
        return inner(model, comm, partition, p, *graphs)

    monkeypatch.setattr(rank_module, "rank_forward", spy)
    return seen


@pytest.fixture
def fixed_step_cost():
    """make(a, b): a StepCost whose line is seconds = a + b * tokens and stays there whatever steps run,
    so what is derived from it (the stall bound's chunk, early rejection's prediction) is known in advance."""
    def make(a: float, b: float) -> StepCost:
        cost = StepCost()
        cost.fit = (a, b)
        cost.observe = cost.observe_shape = lambda *step: None
        return cost

    return make
