"""What a parallel pass's per-device statistics say, per layer: the communication that overlap hid."""

from __future__ import annotations

from ..parallel.executor import DeviceStats


def layer_overlap(devices: list[DeviceStats], s_per_byte: list[float] | None = None) -> list[dict]:
    """Per layer, averaged over devices: communication time, the part compute did not hide.

    comm_s is the wire time of the bytes each device sent: bytes at the measured rate of the link
    it sends on (s_per_byte, per device in rank order), or, without rates, its time handing them to
    the transport -- over TCP that returns once the socket buffer holds them, so it is a lower
    bound. exposed_s is the time ranks sat blocked waiting for a peer; hidden_s = comm_s -
    exposed_s (at least 0) is what tile overlap hid behind the GEMMs. Waiting also absorbs load
    imbalance, so hidden_s is a lower bound too.
    """
    layers: dict[str, dict] = {}
    for r, dev in enumerate(devices):
        spb = s_per_byte[r] if s_per_byte and r < len(s_per_byte) else 0.0
        for op in dev.ops:
            name = op.tag.split(".")[0]
            row = layers.setdefault(name, {"layer": name, "wall_s": 0.0, "compute_s": 0.0, "comm_s": 0.0,
                                           "exposed_s": 0.0, "bytes": 0})
            row["wall_s"] += op.wall_s
            row["compute_s"] += op.compute_s
            row["comm_s"] += max(op.send_s, op.bytes * spb) if spb else op.send_s
            row["exposed_s"] += op.wait_s
            row["bytes"] += op.bytes
    n = max(1, len(devices))
    out = []
    for row in layers.values():
        for k in ("wall_s", "compute_s", "comm_s", "exposed_s"):
            row[k] /= n
        row["hidden_s"] = max(0.0, row["comm_s"] - row["exposed_s"])
        row["hidden_frac"] = row["hidden_s"] / row["comm_s"] if row["comm_s"] > 0 else 0.0
        out.append(row)
    return out
