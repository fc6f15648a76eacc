"""Galaxy: collaborative transformer inference across heterogeneous edge devices.

    import galaxy
    with galaxy.connect(local=3) as cluster:
        print(cluster.load("smollm2").generate("The capital of France is", max_new_tokens=8))
"""

import os as _os

__version__ = "0.1.0"

# gRPC's C core logs every failed TLS handshake and reconnect at INFO on stderr; Galaxy reports
# failures itself, naming the device. GRPC_VERBOSITY=INFO in the environment brings them back.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from .api import Model, Session, connect  # noqa: E402
from .errors import (  # noqa: E402
    AuthError,
    DeviceOutOfMemory,
    GalaxyError,
    PeerUnreachable,
    PlanMismatch,
    ProtocolMismatch,
    TransportError,
    WorkerError,
)

__all__ = ["connect", "Session", "Model", "GalaxyError", "PeerUnreachable", "DeviceOutOfMemory", "PlanMismatch",
           "AuthError", "ProtocolMismatch", "TransportError", "WorkerError", "__version__"]
