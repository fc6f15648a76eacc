"""Running models on a cluster from code: the Python API and what it is made of.

- `api`: `connect`, `Session`, `Model` (generate, stream, chat, encode);
- `generate`: autoregressive generation over an executor, with a prefix cache; `sampling`;
- `recovery`: an executor that re-plans around devices that drop out or slow down;
- `inproc`: ranks as threads of this process (no sockets);
- `sources`: model sources, inputs and the single-device references runs are checked against;
- `report`: what a pass's per-device statistics say (busy time, overlap per layer).
"""
