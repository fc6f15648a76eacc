"""Every gRPC channel and server port Galaxy opens, with one set of options and credentials.

With TLS (security.TlsFiles) both ends authenticate: the worker demands a client certificate
signed by the cluster CA, and the client checks the worker's against the same CA, under the
name every cluster certificate carries. Keepalive pings detect a peer whose link went silent.
"""

from __future__ import annotations

import errno
import socket

import grpc

from ..errors import GalaxyError
from .protocol import channel_options
from .security import CLUSTER_NAME, TlsFiles

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),  # ping an idle connection every 20 s ...
    ("grpc.keepalive_timeout_ms", 10_000),  # ... and drop it if the ping is not answered in 10 s
    ("grpc.keepalive_permit_without_calls", 1),
]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),  # a second worker on a taken port must fail, not share its connections
    ]


def open_channel(address: str, tls: TlsFiles | None = None) -> grpc.Channel:
    opts = channel_options() + _KEEPALIVE
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    return grpc.secure_channel(address, creds, options=opts + [("grpc.ssl_target_name_override", CLUSTER_NAME)])


def check_bindable(host: str, port: int, what: str = "--listen") -> None:
    """Raise a GalaxyError saying why `host:port` cannot be bound (in use, not this device's address).

    gRPC's own bind failure is a raw C-core log line and a bare 0; binding a plain socket first
    (SO_REUSEADDR, as gRPC binds) gets the errno, before gRPC prints anything. Port 0 always binds."""
    if port == 0:
        return
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise GalaxyError(f"{what} {host}:{port}: cannot resolve {host!r} ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise GalaxyError(f"{what} {host}:{port}: port {port} is in use (another worker? `ss -ltnp "
                                  f"'sport = :{port}'` shows which process); pick another port, or port 0 for any "
                                  "free one") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise GalaxyError(f"{what} {host}:{port}: {host} is not an address of this device; use one of its "
                                  "addresses, 127.0.0.1, or 0.0.0.0 for all") from None
            if e.errno == errno.EACCES:
                raise GalaxyError(f"{what} {host}:{port}: ports below 1024 need root; pick a port above 1024") from None
            raise GalaxyError(f"{what} {host}:{port}: cannot bind ({e.strerror})") from None


def add_port(server: grpc.Server, address: str, tls: TlsFiles | None = None) -> int:
    """Bind `address`; mutual TLS when tls is given. Returns the port (0 when binding failed)."""
    try:
        if tls is None:
            return server.add_insecure_port(address)
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                            require_client_auth=True)
        return server.add_secure_port(address, creds)
    except RuntimeError:
        return 0
