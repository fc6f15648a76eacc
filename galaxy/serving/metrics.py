"""The endpoint's Prometheus metrics (`GET /metrics`): what each request saw, and the engine's state.

Per request, when it ends: time to first token, time per output token and end-to-end latency
(histograms), prompt and generated tokens, and the outcome. At each scrape, read from the engine:
requests running and waiting, requests refused by early rejection, KV blocks in use of the pool, the
prefix cache's hit rate (reused prompt tokens over looked-up ones: recomputed tokens do not count as
hits), preemptions and steps, and each device's KV memory. One registry per server, so servers in
one process do not collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.generation import Generation

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _EngineCollector:
    """Gauges read from the engine at scrape time (nothing to keep in sync)."""

    def __init__(self, load: Callable[[], dict | None]):
        self.load = load

    def collect(self):
        state = self.load()
        if state is None:  # an encoder: no engine
            return
        for name, key, doc in (("galaxy_requests_running", "running", "Requests holding KV blocks"),
                               ("galaxy_requests_waiting", "waiting", "Requests queued for admission"),
                               ("galaxy_kv_blocks", "kv_blocks", "KV blocks in the pool (same ids on every device)"),
                               ("galaxy_kv_blocks_used", "kv_blocks_used", "KV blocks held by running requests"),
                               ("galaxy_prefix_cache_hit_rate", "prefix_hit_rate",
                                "Prompt tokens whose K/V were reused, over prompt tokens looked up")):
            yield GaugeMetricFamily(name, doc, value=state[key])
        for name, key, doc in (("galaxy_preemptions", "preemptions", "Sequences preempted (recomputed later)"),
                               ("galaxy_engine_steps", "steps", "Engine iterations run on the devices"),
                               ("galaxy_engine_tokens", "generated_tokens",
                                "Tokens sampled by the engine as they come, every request")):
            yield CounterMetricFamily(name, doc, value=state[key])
        yield CounterMetricFamily("galaxy_requests_rejected", "Requests refused at once because their TTFT was "
                                  "predicted to miss the objective (--slo-ttft; HTTP 503)",
                                  value=state.get("rejected", 0))
        kv = GaugeMetricFamily("galaxy_device_kv_bytes", "KV cache memory on each device", labels=["device"])
        for name, nbytes in state["kv_bytes"].items():
            kv.add_metric([name], nbytes)
        yield kv


class ServerMetrics:
    def __init__(self, engine_load: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("galaxy_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("galaxy_generations", "Generations ended, by finish reason", ["finish"], registry=r)
        self.ttft = Histogram("galaxy_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("galaxy_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("galaxy_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter("galaxy_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("galaxy_generation_tokens", "Tokens generated", registry=r)
        r.register(_EngineCollector(engine_load))

    def generation(self, gen: Generation) -> None:
        """Record a generation that ended (whatever the reason)."""
        self.finished.labels(gen.finish or "abort").inc()
        self.prompt_tokens.inc(len(gen.prompt_tokens))
        self.generated_tokens.inc(len(gen.tokens))
        if gen.first_token_s is not None:
            self.ttft.observe(gen.first_token_s)
        if len(gen.token_times) > 1:
            self.tpot.observe(gen.per_token_s)
        if gen.token_times:
            self.e2e.observe(gen.token_times[-1])

    def totals(self) -> dict[str, float]:
        """The latency histograms' running sums and counts, read from the registry /metrics renders
        (the dashboard's TTFT and TPOT over time are their differences between samples)."""
        get = self.registry.get_sample_value
        return {f"{short}_{part}": get(f"{name}_{part}") or 0.0
                for short, name in (("ttft", "galaxy_time_to_first_token_seconds"),
                                    ("tpot", "galaxy_time_per_output_token_seconds"))
                for part in ("sum", "count")}

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
