"""Galaxy: collaborative transformer inference across heterogeneous edge devices.

    import galaxy
    with galaxy.connect(local=3) as cluster:
        print(cluster.load().generate("The capital of France is", max_new_tokens=8))

The names below are loaded on first use (PEP 562): `import galaxy.parallel.sharding` does not
pull in the API, gRPC or the planner, and importing the package changes nothing in the process.
The layers, and where to find what: docs/architecture.md.
"""

from __future__ import annotations

import importlib

from .version import __version__

_LAZY = {
    "connect": "galaxy.runtime.api",
    "Session": "galaxy.runtime.api",
    "Model": "galaxy.runtime.api",
    **{name: "galaxy.errors" for name in (
        "GalaxyError", "PeerUnreachable", "DeviceOutOfMemory", "PlanMismatch", "AuthError", "ProtocolMismatch",
        "TransportError", "WorkerError", "NotAWorker", "InvalidRequest", "ModelUnloaded", "CacheLost",
        "KVBudgetExceeded", "Overloaded")},
    "CheckpointError": "galaxy.model.checkpoints.source",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'galaxy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
