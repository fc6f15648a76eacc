"""A Hello that finds no worker says what it found instead: refused (at once), nothing answering,
a web server, a silent server, TLS on one side only, another cluster CA (transport/probe.py)."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from galaxy.cli import main
from galaxy.errors import AuthError, NotAWorker, PeerUnreachable
from galaxy.transport import probe as pr
from galaxy.transport.client import Cluster
from galaxy.transport.security import COORDINATOR, TlsFiles, init_keys


@pytest.fixture
def http_server():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def silent_server():
    """Accepts TCP connections (the kernel does, from the backlog) and never says a word."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def free_address():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    return address


class _NoHello:
    """A stub that fails the test if the coordinator sends a Hello at all."""

    def Hello(self, *args, **kwargs):  # noqa: N802 - the gRPC method name
        raise AssertionError("a Hello was sent to a port that refused connections")


def test_refused_connection_is_reported_before_any_rpc_wait(free_address):
    with Cluster([free_address], connect_timeout=600) as c:  # a Hello would wait up to 600 s for the worker
        c.stubs = [_NoHello()]
        with pytest.raises(PeerUnreachable, match=rf"device 0 .*connection refused -- nothing listens on port "
                           rf"{free_address.split(':')[1]}.*start `galaxy worker --listen {free_address}`"):
            c.hello()


def test_web_server_is_not_a_worker(http_server):
    assert pr.probe(http_server).kind == pr.HTTP1
    with Cluster([http_server], connect_timeout=1) as c, pytest.raises(
            NotAWorker, match=r"not a Galaxy worker at .*an HTTP/1 server answered.*check the port") as e:
        c.hello()
    assert "TLS" not in str(e.value)


def test_silent_server_is_not_a_worker(silent_server):
    assert pr.probe(silent_server, timeout=0.3).kind == pr.SILENT
    with Cluster([silent_server], connect_timeout=1) as c, pytest.raises(
            NotAWorker, match=r"accepted the connection but sent nothing within 1 s") as e:
        c.hello()
    assert "TLS" not in str(e.value) and isinstance(e.value, PeerUnreachable)


def test_probe_tells_plaintext_grpc_from_tls_workers(servers, tmp_path):
    init_keys(tmp_path, ["w0"])
    plain = servers.start(1)[0]
    tls = servers.start(1, tls=TlsFiles.load(tmp_path, "w0"))[0]
    assert pr.probe(plain).kind == pr.HTTP2
    found = pr.probe(tls, ca=TlsFiles.load(tmp_path, COORDINATOR).ca)
    assert (found.kind, found.tls_ca_ok) == (pr.TLS, True)


def test_tls_on_one_side_only_and_other_cas_are_named(servers, tmp_path):
    good, other = tmp_path / "good", tmp_path / "other"
    init_keys(good, ["w0"])
    init_keys(other, ["w0"])
    mine, theirs = TlsFiles.load(good, "w0"), TlsFiles.load(other, "w0")
    plain = servers.start(1)[0]
    tls = servers.start(1, tls=mine)[0]
    # its certificate is from our CA, but it trusts another one
    trusts_other = servers.start(1, tls=TlsFiles(theirs.ca, mine.cert, mine.key, "w0"))[0]
    cases = [
        (tls, None, r"uses TLS and this coordinator does not: connect with --tls DIR"),
        (plain, TlsFiles.load(good, COORDINATOR), r"runs without TLS and this coordinator uses it"),
        (tls, TlsFiles.load(other, COORDINATOR), r"certificate at .* is not from this coordinator's cluster CA"),
        (trusts_other, TlsFiles.load(good, COORDINATOR), r"is from our cluster CA, but it refused ours"),
    ]
    for address, coordinator_tls, message in cases:
        with Cluster([address], tls=coordinator_tls, connect_timeout=1) as c, pytest.raises(AuthError, match=message):
            c.hello()


def test_cli_run_against_a_web_server_says_it_is_not_a_worker(http_server, capsys):
    # the command's main() in this process: what it says does not depend on a process of its own, and a
    # fresh one spent ~2.5 s importing before it reached the address
    assert main(["run", "--workers", http_server, "--random-init", "tiny-gpt2", "--seq-len", "4"]) == 2
    err = capsys.readouterr().err
    assert "not a Galaxy worker" in err and "HTTP/1 server answered" in err and "TLS" not in err
