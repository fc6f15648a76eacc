"""Edge devices for Galaxy: a catalog of real device profiles and an emulated LAN of them.

- `catalog/*.yaml`: one real device each (relative compute with its published source, memory,
  typical link); `links.yaml`: link presets; `clusters/*.yaml`: ready clusters.
- `spec.py` parses and validates cluster files (pure); `layout.py` turns one into names,
  addresses and commands (pure); `system.py` runs them; `emulate.py` brings clusters up and
  down; `check.py` + `probe.py` measure their fidelity; `cli.py` is `galaxy devices ...`.

Importing this package imports neither torch nor grpc.
"""
