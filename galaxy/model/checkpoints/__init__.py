"""Where weights come from: one lazy interface (`source.WeightSource`) over HF directories (`hf`),
GGUF files (`gguf`) and random init (`random`). Every source speaks canonical tensor names and
layouts (listed in `source`), so sharding never needs to know the file format.
"""

from __future__ import annotations

from pathlib import Path

from .gguf import GGUFCheckpoint
from .hf import HFCheckpoint
from .source import CheckpointError, WeightSource, expected_shapes

__all__ = ["CheckpointError", "WeightSource", "expected_shapes", "open_checkpoint"]


def open_checkpoint(path: str | Path) -> WeightSource:
    """Open an HF-style directory (config.json + safetensors/bin) or a .gguf file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not exist; pass an HF-style directory (config.json + "
            "*.safetensors or pytorch_model.bin + tokenizer.json) or a .gguf file"
        )
    if p.is_file() and p.suffix == ".gguf":
        return GGUFCheckpoint(p)
    if p.is_dir():
        return HFCheckpoint(p)
    raise CheckpointError(f"checkpoint {str(p)!r} is neither a directory nor a .gguf file")
