"""Start N `galaxy worker` processes on loopback, and always stop them again.

`--local N` uses this: real processes and real gRPC, with no set-up. Workers are started with
--exit-with-parent, so even a coordinator killed with SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import time

from ..errors import GalaxyError
from .worker import READY_LINE

log = logging.getLogger(__name__)

# Fresh large messages page-fault with glibc's default malloc; these keep big buffers mapped
# (measured: an 8 MB tensor serialised in 1.3-2.2 ms instead of 19.8 ms, see MACHINE.md).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def worker_command(listen: str, name: str, threads: int, token: str | None = None,
                   extra: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "galaxy.cli", "-q", "worker", "--listen", listen, "--name", name,
           "--threads", str(threads), "--exit-with-parent"]
    return cmd + (extra or [])


class LocalWorkers:
    """N workers on 127.0.0.1 with free ports; a context manager that always cleans up."""

    def __init__(self, n: int, threads: int | None = None, token: str | None = None,
                 startup_timeout: float = 60.0, extra_args: list[str] | None = None,
                 per_worker_args: list[list[str]] | None = None):
        if n < 1:
            raise GalaxyError(f"need at least one local worker, got {n}")
        self.n = n
        self.threads = threads or max(1, (os.cpu_count() or 1) // n)
        self.token, self.startup_timeout, self.extra_args = token, startup_timeout, extra_args
        self.per_worker_args = per_worker_args or [[] for _ in range(n)]
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def start(self) -> list[str]:
        env = {**os.environ, **MALLOC_ENV, "PYTHONUNBUFFERED": "1"}
        if self.token:
            env["GALAXY_TOKEN"] = self.token
        try:
            for i in range(self.n):
                cmd = worker_command("127.0.0.1:0", f"local{i}", self.threads,
                                     extra=(self.extra_args or []) + self.per_worker_args[i])
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, env=env,
                                                   start_new_session=True, text=True))
            self.addresses = [self._wait_ready(i, p) for i, p in enumerate(self.procs)]
        except BaseException:
            self.stop()
            raise
        return self.addresses

    def _wait_ready(self, i: int, proc: subprocess.Popen) -> str:
        deadline = time.monotonic() + self.startup_timeout
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise GalaxyError(f"local worker {i} exited with status {proc.returncode} while starting")
                if sel.select(timeout=0.2):
                    line = proc.stdout.readline()
                    if line.startswith(READY_LINE):
                        return line.split()[1]
            raise GalaxyError(f"local worker {i} did not start within {self.startup_timeout:.0f} s")
        finally:
            sel.close()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d ignored SIGTERM; killing it", p.pid)
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
            if p.stdout:
                p.stdout.close()
        self.procs, self.addresses = [], []

    def __enter__(self) -> list[str]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
