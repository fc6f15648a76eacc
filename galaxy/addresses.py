"""HOST:PORT addresses, parsed in one place: worker, data-port, discovery and cluster-file addresses.

IPv6 hosts are written in brackets ("[fe80::1]:50051") and returned without them.
"""

from __future__ import annotations

from .errors import GalaxyError


class AddressError(GalaxyError, ValueError):
    """An address that is not HOST:PORT; the message names it and what was expected."""


def split_address(address: str, what: str = "address", allow_port_zero: bool = False) -> tuple[str, int]:
    """(host, port) of "HOST:PORT"; port 0 ("any free port") only where a listener may pick one."""
    host, sep, port = str(address).rpartition(":")
    low = 0 if allow_port_zero else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
        raise AddressError(f"{what} {address!r} is not HOST:PORT (a port in {low}..65535)")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    """The inverse of split_address (brackets around an IPv6 host)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
