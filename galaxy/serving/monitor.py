"""The dashboard's live inputs, gathered in background threads so no HTTP request ever waits on a device.

- Device polls: every `poll_s` seconds, a hello to every device at once (Executor.hello_each), each
  with a `timeout_s` deadline and no wait for a connection. A device that answers is up; one that
  refuses, fails or stays silent past the deadline is down, with the error. A killed worker refuses
  at once, so the page shows it down within one poll interval plus its own refresh (1 s each by
  default) -- within the cluster's heartbeat window (3 missed 1-second pings).
- Ring links: once, at start, in a thread of its own (so polls go on meanwhile), each device
  measures its link to the next one in the ring with real transfers (Cluster.link_test: pings,
  then about half a second of streaming). Executors without links (in-process threads) skip it;
  so does `measure_links=False`.
- History: every `sample_s` seconds a sample of the engine's numbers (dashboard.History).

`snapshot()` returns what was last found; the HTTP handlers read only that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..parallel.executor import DeviceInfo
from .dashboard import DeviceStatus, History, RingLink

log = logging.getLogger(__name__)


class Monitor:
    """Polls the devices and samples the engine while started; `stop()` joins its threads."""

    def __init__(self, executor, *, engine_load: Callable[[], dict | None] = lambda: None,
                 totals: Callable[[], dict[str, float]] = dict, poll_s: float = 1.0, timeout_s: float = 1.0,
                 sample_s: float = 1.0, history_s: float = 300.0, measure_links: bool = True):
        for name, v in (("poll_s", poll_s), ("timeout_s", timeout_s), ("sample_s", sample_s),
                        ("history_s", history_s)):
            if not v > 0:
                raise ValueError(f"Monitor: {name}={v} must be above 0")
        if history_s < 2 * sample_s:
            raise ValueError(f"Monitor: history_s={history_s} must hold at least two samples of "
                             f"sample_s={sample_s}")
        self.ex, self.engine_load, self.totals = executor, engine_load, totals
        self.poll_s, self.timeout_s, self.sample_s = poll_s, timeout_s, sample_s
        self.measure_links = measure_links
        self.link_timeout_s = 10.0  # a link test that hangs gives up rather than outlive stop()
        self.history = History(int(history_s / sample_s))
        self.links: list[RingLink] = []
        self.links_error = ""
        self._statuses: list[DeviceStatus] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> Monitor:
        if self._threads:
            return self
        self._stop.clear()
        self.poll()  # the first state is there before the page asks (bounded by timeout_s)
        loops = [("galaxy-serve-monitor", self._poll_loop), ("galaxy-serve-history", self._sample_loop)]
        if self.measure_links:
            loops.append(("galaxy-serve-links", self._measure_links))
        for name, fn in loops:
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    # what the handlers read -----------------------------------------------------------------------------
    def statuses(self) -> list[DeviceStatus]:
        with self._lock:
            return list(self._statuses)

    def history_view(self) -> dict:
        with self._lock:
            return self.history.view(self.sample_s)

    def rss(self) -> list[int | None]:
        return [s.info.rss if s.up and s.info is not None else None for s in self.statuses()]

    # the work -------------------------------------------------------------------------------------------
    def poll(self) -> list[DeviceStatus]:
        """Hello every device once (at most timeout_s) and record who answered."""
        now = time.time()
        try:
            answers = self.ex.hello_each(self.timeout_s)
        except Exception as e:  # noqa: BLE001 - e.g. a re-planning executor swapping its connections
            answers = [e] * len(self._statuses)
        with self._lock:
            prev = {s.rank: s for s in self._statuses}
            out = []
            for r, a in enumerate(answers):
                old = prev.get(r)
                if isinstance(a, DeviceInfo):
                    out.append(DeviceStatus(r, True, a, "", now, now))
                else:
                    out.append(DeviceStatus(r, False, old.info if old else None, f"{type(a).__name__}: {a}", now,
                                            old.last_seen if old else 0.0))
                    if old is None or old.up:
                        log.warning("dashboard: %s is down: %s", self.ex.names[r] if r < len(self.ex.names)
                                    else f"device {r}", a)
            self._statuses = out
            return list(out)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def _measure_links(self) -> None:
        """Each ring link once: device r to device r+1 (the direction its collectives send)."""
        # a ResilientCluster wraps the Cluster that holds the links to test
        test = getattr(self.ex, "link_test", None) or getattr(getattr(self.ex, "cluster", None), "link_test", None)
        n = self.ex.world
        if test is None or n < 2:
            return
        links = []
        for r in range(n):
            if self._stop.is_set():
                return
            try:
                rep = test(r, (r + 1) % n, timeout=self.link_timeout_s)
            except Exception as e:  # noqa: BLE001 - a failed measurement is shown, not fatal
                self.links_error = f"{type(e).__name__}: {e}"
                log.warning("dashboard: measuring the link from device %d: %s", r, e)
                continue
            links.append(RingLink(r, (r + 1) % n, rep.bandwidth_bps, rep.latency_s))
            self.links = list(links)

    def sample(self) -> dict:
        try:
            load = self.engine_load()
        except Exception as e:  # noqa: BLE001 - an engine closed under us: no sample of it
            log.debug("dashboard: no engine sample: %s", e)
            load = None
        totals, rss = self.totals(), self.rss()
        with self._lock:
            return self.history.add(time.time(), load, totals, rss)

    def _sample_loop(self) -> None:
        self.sample()
        while not self._stop.wait(self.sample_s):
            self.sample()
