"""Everything that crosses a network: the only package that imports grpc.

- `worker`: `galaxy worker`, one long-running peer per device (its gRPC servicer);
- `client`: the coordinator's `Cluster` of workers (an `Executor`);
- `peers` / `datalink`: the peer data plane (tiles over TCP, or gRPC `Exchange` streams);
- `protocol`: tensor <-> protobuf conversion and protocol constants, the one place bytes become tensors;
- `channels`, `security` (mutual TLS, tokens), `discovery` (LAN announcements), `linktest`;
- `shardstore`: weight shards streamed to a device and cached there; `spawn`: local worker processes;
- `resources`: the CPU and memory this process may use, as a worker reports them;
- `probe`: what is at an address when a Hello fails (refused, silent, a web server, TLS on one side only).
"""

import os as _os

# gRPC's C core logs every failed TLS handshake and reconnect at INFO on stderr; Galaxy reports
# failures itself, naming the device. Set before grpc is first imported (every module here imports
# it through this package); GRPC_VERBOSITY=INFO in the environment brings them back.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
