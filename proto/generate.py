"""Regenerate galaxy/v1/*_pb2*.py from proto/galaxy/v1/*.proto (needs grpcio-tools).

    python proto/generate.py

The generated files are checked in, so installing Galaxy needs no protoc; never edit them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", *protos]
    return protoc.main(args)


if __name__ == "__main__":
    sys.exit(main())
