"""Per-link activation compression: which wire format each link should carry.

Sending b float32 bytes in format f over a link of bandwidth B costs, per byte,
    BYTES_PER_VALUE[f] / 4 * 8 / B  +  encode/decode time (measured on both ends, per byte).
With lossy transfer allowed, each link gets the format with the smallest cost, but the more
precise one wins unless the lossier is at least `min_gain` faster: a fast LAN keeps fp32.
The planner then solves on *effective* links, so its predictions include the compression.
"""

from __future__ import annotations

from dataclasses import replace

from galaxy.parallel.codec import BYTES_PER_VALUE, FORMATS

from .profile import ClusterProfile, Link

PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8")  # most precise first


def seconds_per_byte(fmt: str, link: Link, send_codec: dict, recv_codec: dict) -> float:
    """Time to move one float32 byte of activations over `link` in `fmt`, codecs included."""
    wire_bits = BYTES_PER_VALUE[fmt] / 4.0 * 8.0
    return wire_bits / link.bandwidth_bps + send_codec.get(fmt, 0.0) + recv_codec.get(fmt, 0.0)


def choose(cluster: ClusterProfile, allowed: tuple[str, ...] = FORMATS, min_gain: float = 0.10) -> list[list[str]]:
    """wire[i][j]: the format device i sends to device j (fp32 on the diagonal)."""
    n = len(cluster.devices)
    out = [["fp32"] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            link = cluster.links[i][j] if cluster.links else None
            if i == j or link is None:
                continue
            best, best_t = "fp32", seconds_per_byte("fp32", link, {}, {})
            for fmt in PRECISION_ORDER[1:]:
                if fmt not in allowed:
                    continue
                t = seconds_per_byte(fmt, link, cluster.devices[i].codec_s_per_byte,
                                     cluster.devices[j].codec_s_per_byte)
                if t < best_t * (1 - min_gain):
                    best, best_t = fmt, t
            out[i][j] = best
    return out


def effective(cluster: ClusterProfile, wire: list[list[str]]) -> ClusterProfile:
    """The cluster as the solver should see it: each link as fast as its format makes it."""
    links = []
    for i, row in enumerate(cluster.links):
        new_row = []
        for j, link in enumerate(row):
            if link is None or wire[i][j] == "fp32":
                new_row.append(link)
                continue
            t = seconds_per_byte(wire[i][j], link, cluster.devices[i].codec_s_per_byte,
                                 cluster.devices[j].codec_s_per_byte)
            new_row.append(replace(link, bandwidth_bps=8.0 / t))
        links.append(new_row)
    return ClusterProfile(list(cluster.devices), links)
