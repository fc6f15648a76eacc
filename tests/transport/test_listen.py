"""A worker that cannot listen says why in one line: the port is in use, or the host is not this device's."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from galaxy.errors import GalaxyError
from galaxy.transport.worker import WorkerSettings, start_server


def test_worker_on_a_port_in_use_says_so_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "galaxy.cli", "worker", "--listen", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"galaxy worker: error: --listen 127.0.0.1:{port}: port {port} is in use (another worker? "
        f"`ss -ltnp 'sport = :{port}'` shows which process); pick another port, or port 0 for any free one"]


def test_a_second_worker_cannot_share_a_workers_port(servers):
    first = servers.start(1)[0]
    with pytest.raises(GalaxyError, match=r"port \d+ is in use"):
        start_server(first, WorkerSettings(name="second"))


def test_worker_on_an_address_of_another_device_says_so():
    with pytest.raises(GalaxyError, match=r"192\.0\.2\.1 is not an address of this device"):
        start_server("192.0.2.1:50999", WorkerSettings(name="w", token="t"))  # TEST-NET-1: never local
