"""What is at a worker's address, found by looking: for the coordinator's error messages.

When a gRPC Hello fails, gRPC says only UNAVAILABLE or DEADLINE_EXCEEDED. The user needs to know
which of very different things happened: nothing listens there (connection refused), nothing
answers at all (host down, packets dropped), something that is not a Galaxy worker answered (a
web server, another service, a process that accepts and stays silent), or a worker is there but
the two sides disagree about TLS or the cluster CA. `probe` opens its own short connections and
tells these apart from what comes back:

    plaintext HTTP/2 preface  ->  SETTINGS frame: a plaintext HTTP/2 (gRPC) server
                              ->  "HTTP/1.x ...": a web server
                              ->  a TLS record: a TLS server
                              ->  the connection closed: try a TLS handshake -- it succeeds: a TLS server
                              ->  nothing within the timeout: a silent server

`reach` is the first step alone (a TCP connect), cheap enough to run before every Hello so a
refused connection fails at once instead of after gRPC's wait-for-ready deadline.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

from ..addresses import split_address
from ..errors import AuthError, GalaxyError, NotAWorker, PeerUnreachable

# What an HTTP/2 client sends first (RFC 9113 3.4): the preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS = 0x4
TLS_RECORDS = (0x15, 0x16)  # alert, handshake

# kinds of finding
REFUSED = "refused"  # nothing listens on the port
NO_ANSWER = "no-answer"  # the TCP connect got no reply in time
UNREACHABLE = "unreachable"  # no route, bad name, ... (the OS said so)
HTTP1 = "http1"  # a web server answered
HTTP2 = "http2"  # a plaintext HTTP/2 server (a gRPC server without TLS)
TLS = "tls"  # a TLS server
SILENT = "silent"  # accepted the connection, said nothing
CLOSED = "closed"  # accepted, then closed without a word, and no TLS either
OTHER = "other"  # answered with something else


@dataclass(frozen=True)
class Finding:
    kind: str
    detail: str = ""  # what was seen: the status line, the OS error, the first bytes, ...
    tls_ca_ok: bool | None = None  # TLS: the server's certificate verifies against our CA (None: not checked)


def _connect(address: str, timeout: float) -> tuple[socket.socket | None, Finding | None]:
    host, port = split_address(address)
    try:
        return socket.create_connection((host, port), timeout=timeout), None
    except ConnectionRefusedError:
        return None, Finding(REFUSED, f"nothing listens on port {port} of {host}")
    except TimeoutError:
        return None, Finding(NO_ANSWER, f"no reply from {host} within {timeout:g} s")
    except socket.gaierror as e:
        return None, Finding(UNREACHABLE, f"cannot resolve {host!r} ({e.strerror})")
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            return None, Finding(REFUSED, f"nothing listens on port {port} of {host}")
        return None, Finding(UNREACHABLE, e.strerror or str(e))


def reach(address: str, timeout: float = 1.0) -> Finding | None:
    """None if a TCP connection opens; else why not (refused, unreachable, no answer)."""
    sock, finding = _connect(address, timeout)
    if sock is not None:
        sock.close()
    return finding


def _first_bytes(address: str, timeout: float) -> tuple[bytes | None, Finding | None]:
    """What the server sends back after an HTTP/2 preface (b'' if it closed; None if silent)."""
    sock, finding = _connect(address, timeout)
    if sock is None:
        return None, finding
    with sock:
        try:
            sock.sendall(H2_PREFACE)
            return sock.recv(256), None
        except TimeoutError:
            return None, None
        except OSError:  # reset by the peer: as good as closed
            return b"", None


def _tls_handshake(address: str, timeout: float, ca: bytes | None) -> tuple[bool, bool | None]:
    """(a TLS server answered, its certificate verifies against `ca` -- None when not checked)."""
    host, port = split_address(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw) as tls:
            cert = tls.getpeercert(binary_form=True)
    except ssl.SSLError as e:  # a TLS alert is still a TLS server (one that wanted our certificate first)
        return "ALERT" in (e.reason or ""), None
    except OSError:
        return False, None
    if ca is None or cert is None:
        return True, None
    return True, _signed_by(cert, ca)


def _signed_by(cert_der: bytes, ca_pem: bytes) -> bool:
    """Whether the certificate is signed by the CA (the check the gRPC client makes, minus the name)."""
    from cryptography import x509

    try:
        x509.load_der_x509_certificate(cert_der).verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        return True
    except Exception:  # noqa: BLE001 - any failure (another issuer, a bad signature) means "not this CA"
        return False


def _printable(data: bytes) -> str:
    text = data[:40].decode("latin-1")
    return "".join(c if c.isprintable() else "." for c in text)


def probe(address: str, timeout: float = 1.0, ca: bytes | None = None) -> Finding:
    """What is at `address`. ca: our cluster CA (PEM), to say whether a TLS server's certificate is from it."""
    data, finding = _first_bytes(address, timeout)
    if finding is not None:
        return finding
    if data is None:
        return Finding(SILENT, f"accepted the connection but sent nothing within {timeout:g} s")
    if data.startswith(b"HTTP/"):
        return Finding(HTTP1, data.split(b"\r\n", 1)[0].decode("latin-1"))
    if data.lstrip()[:1] == b"<" and b"html" in data.lower():  # an HTTP/0.9-style answer: the page alone
        return Finding(HTTP1, f"an HTML page, {_printable(data.lstrip())!r}")
    if len(data) >= 9 and data[3] == H2_SETTINGS:
        return Finding(HTTP2, "answered HTTP/2 in plaintext")
    if len(data) >= 2 and data[0] in TLS_RECORDS and data[1] == 0x03:
        ok, ca_ok = _tls_handshake(address, timeout, ca)
        return Finding(TLS, "answered with TLS", ca_ok if ok else None)
    if not data:
        ok, ca_ok = _tls_handshake(address, timeout, ca)
        if ok:
            return Finding(TLS, "completed a TLS handshake", ca_ok)
        return Finding(CLOSED, "closed the connection without answering")
    return Finding(OTHER, f"answered {_printable(data)!r}")


def not_a_worker(finding: Finding, tls: bool) -> bool:
    """Whether what answered at the address can never become a worker this coordinator talks to, however
    long it waits: a web server, something neither gRPC nor TLS, TLS on one side only, another cluster
    CA. A plaintext gRPC server (a worker too busy to answer yet) and a silent port may still turn out
    to be one."""
    if finding.kind in (HTTP1, OTHER, CLOSED):
        return True
    if finding.kind == HTTP2:
        return tls
    if finding.kind == TLS:
        return not tls or finding.tls_ca_ok is False
    return False


def explain(finding: Finding, device: str, address: str, tls: bool, failure: str) -> GalaxyError:
    """The typed error for a Hello that failed (`failure`: gRPC's code and detail), given what is there.
    tls: whether this coordinator connects with TLS."""
    kind, detail = finding.kind, finding.detail
    if kind == REFUSED:
        return PeerUnreachable(f"{device}: connection refused -- {detail}; start `galaxy worker --listen {address}` "
                               "there, or fix the address")
    if kind == NO_ANSWER:
        return PeerUnreachable(f"{device}: nothing answered at {address} ({detail}): the device is off, the address "
                               "is wrong, or a firewall drops the packets")
    if kind == UNREACHABLE:
        return PeerUnreachable(f"{device}: cannot reach {address}: {detail}; check the address and the network")
    if kind == HTTP1:
        return NotAWorker(f"{device}: not a Galaxy worker at {address}: an HTTP/1 server answered ({detail!r}); a "
                          "worker speaks gRPC on its --listen port -- check the port")
    if kind == SILENT:
        return NotAWorker(f"{device}: not a Galaxy worker at {address}: it {detail} (a worker answers at once); "
                          "check the port, or whether the process there is stuck")
    if kind in (OTHER, CLOSED):
        return NotAWorker(f"{device}: not a Galaxy worker at {address}: it {detail} (neither gRPC nor TLS); "
                          "check the port")
    if kind == HTTP2 and tls:
        return AuthError(f"{device}: the worker at {address} runs without TLS and this coordinator uses it: start "
                         "the worker with --tls DIR (keys from `galaxy keys init`), or connect without TLS")
    if kind == HTTP2:
        return PeerUnreachable(f"{device}: an HTTP/2 server answers at {address}, but the Galaxy Hello did not "
                               f"complete ({failure}): a worker too busy to answer, or another service on this port")
    if not tls:
        return AuthError(f"{device}: the worker at {address} uses TLS and this coordinator does not: connect with "
                         "--tls DIR (tls= in Python), the cluster's keys from `galaxy keys init`")
    if finding.tls_ca_ok is False:
        return AuthError(f"{device}: the TLS handshake failed: the worker's certificate at {address} is not from "
                         "this coordinator's cluster CA; give both sides keys from the same `galaxy keys init` "
                         "directory")
    if finding.tls_ca_ok:
        return AuthError(f"{device}: the TLS handshake failed: the worker's certificate at {address} is from our "
                         "cluster CA, but it refused ours -- it trusts another CA (its --tls DIR is from another "
                         "`galaxy keys init`)")
    return AuthError(f"{device}: the TLS handshake with {address} failed ({failure}): a certificate from another "
                     "cluster CA")
