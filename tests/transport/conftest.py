"""Worker servers inside the test process (real gRPC on loopback, no subprocesses)."""

from __future__ import annotations

import pytest

from galaxy.transport.worker import WorkerSettings, start_server


class Servers:
    def __init__(self):
        self.running = []

    def start(self, n: int, token: str | None = None, **settings) -> list[str]:
        addrs = []
        for i in range(n):
            server, addr, service = start_server("127.0.0.1:0", WorkerSettings(name=f"w{i}", token=token, **settings))
            self.running.append((server, service))
            addrs.append(addr)
        return addrs

    def stop(self, index: int | None = None) -> None:
        for i, (server, service) in enumerate(list(self.running)):
            if index is None or i == index:
                service.close()
                server.stop(grace=0).wait(timeout=10)


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.stop()
