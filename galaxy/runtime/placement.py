"""Where each phase of generation runs: colocated (every device prefills and decodes, as the
serving engine does by default) or disaggregated (a prefill group and a decode group, the K/V of
each sequence moved in between: galaxy/engine/disagg.py).

A placement comes from the caller (`Session.load(placement=...)`, `galaxy serve --prefill-devices
0,1,2 --decode-devices 3`) or from a plan's `serve` section, which the planner writes:

    "serve": {"placement": "disaggregated", "prefill": [0, 1, 2], "decode": [3],
              "prefill_partition": {...}, "decode_partition": {...}}      # partitions optional

Devices are named by their index in the session's ring order, their worker name or their address.
Without partitions the prefill group runs an even Galaxy (HMP) split and the decode group an even
tensor-parallel (megatron) split, or the whole model on a single decode device.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanMismatch
from ..model.config import ModelConfig
from ..parallel.sharding import Partition, PartitionError, Strategy, even_partition

# planner.phases' kinds: "mixed" is a disaggregated placement whose decode device is also a prefill device
PLACEMENTS = ("colocated", "disaggregated", "mixed")


@dataclass(frozen=True)
class Placement:
    """A disaggregated placement: device indices (session ring order) of each group, and optionally
    each group's split. A device may be in both groups (it then holds two shards)."""

    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    prefill_partition: Partition | None = None
    decode_partition: Partition | None = None

    def check(self, world: int) -> Placement:
        for name in ("prefill", "decode"):
            group = getattr(self, name)
            if not group:
                raise PlanMismatch(f"placement: the {name} group has no device")
            if len(set(group)) != len(group) or not all(isinstance(i, int) and 0 <= i < world for i in group):
                raise PlanMismatch(f"placement: {name}={list(group)} must be distinct device indices in 0..{world - 1}")
            part = getattr(self, f"{name}_partition")
            if part is not None and part.world != len(group):
                raise PlanMismatch(f"placement: the {name} partition has {part.world} devices, the group {len(group)}")
        return self

    def partitions(self, cfg: ModelConfig) -> tuple[Partition, Partition]:
        """Each group's split: as given, else even HMP for prefill, even tensor parallelism for decode."""
        pre = self.prefill_partition or even_partition(cfg, len(self.prefill), Strategy.GALAXY)
        dec = self.decode_partition or even_partition(
            cfg, len(self.decode), Strategy.MEGATRON if len(self.decode) > 1 else Strategy.GALAXY)
        return pre.validate(cfg), dec.validate(cfg)

    @classmethod
    def from_serve(cls, serve: dict, names: list[str], addresses: list[str] = ()) -> Placement | None:
        """A plan's `serve` section; None for a colocated placement. Devices by index, name or address."""
        if not isinstance(serve, dict):
            raise PlanMismatch(f"a plan's serve section must be an object, got {serve!r}")
        kind = serve.get("placement", "disaggregated" if "prefill" in serve else "colocated")
        if kind not in PLACEMENTS:
            raise PlanMismatch(f"serve.placement={kind!r} is not one of {PLACEMENTS}")
        if kind == "colocated":
            return None

        def parts(key: str) -> Partition | None:
            d = serve.get(key)
            try:
                return None if d is None else Partition.from_dict(d)
            except PartitionError as e:
                raise PlanMismatch(f"serve.{key}: {e}") from None

        return cls(device_indices(serve.get("prefill"), names, addresses, "serve.prefill"),
                   device_indices(serve.get("decode"), names, addresses, "serve.decode"),
                   parts("prefill_partition"), parts("decode_partition"))


def device_indices(devices, names: list[str], addresses: list[str] = (), what: str = "devices") -> tuple[int, ...]:
    """Indices of devices given by index, worker name or address (a list, or "0,1,2" as on a command line)."""
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if not isinstance(devices, (list, tuple)) or not devices:
        raise PlanMismatch(f"{what}={devices!r}: a non-empty list of device indices, names or addresses")
    out = []
    for d in devices:
        if isinstance(d, int) or (isinstance(d, str) and d.isdigit()):
            out.append(int(d))
        elif d in names:
            out.append(list(names).index(d))
        elif d in addresses:
            out.append(list(addresses).index(d))
        else:
            raise PlanMismatch(f"{what}: no device {d!r} among {list(names)}")
    return tuple(out)
