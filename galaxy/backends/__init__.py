"""Compute backends for a device's shard: torch (the model's own methods) or ONNX Runtime.

- `select`: put a shard on a backend, or pick the faster one from timings taken on the device;
- `onnx` / `export`: swap a shard's block steps for ONNX Runtime sessions (exported once, cached);
- `profiling`: time a device's blocks at several shard sizes, what the planner fits its model to.
"""
