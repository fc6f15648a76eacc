"""Every gRPC channel and server port Galaxy opens, with one set of options and credentials.

With TLS (security.TlsFiles) both ends authenticate: the worker demands a client certificate
signed by the cluster CA, and the client checks the worker's against the same CA, under the
name every cluster certificate carries. Keepalive pings detect a peer whose link went silent.
"""

from __future__ import annotations

import grpc

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
    ]


def open_channel(address: str, tls: TlsFiles | None = None) -> grpc.Channel:
    opts = channel_options() + _KEEPALIVE
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    return grpc.secure_channel(address, creds, options=opts + [("grpc.ssl_target_name_override", CLUSTER_NAME)])


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
