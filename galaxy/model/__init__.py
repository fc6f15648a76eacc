"""The model, on one device: its shape, its blocks, its KV cache, its tokenizer and its weights.

Pure torch (no grpc, psutil or argparse), built for a *range* of heads, MLP columns, vocabulary
rows and layers so that the same blocks serve the whole model and any device's shard of it.

- `config`: `ModelConfig` (five families by architecture switches) and the preset shapes;
- `transformer`: `Transformer`, `Block`, `Attention`, `MLP`, `Embeddings`, the reference forward;
- `paged_kv`: a device's paged KV cache (its own heads only) and attention over block tables;
- `tokenizer`, `checkpoints` (HF directories, GGUF, random init), `defaults` (the embedded models);
- `numerics`: MKL's strict reproducibility, asked for here, before any of it multiplies anything.
"""

from .numerics import ask_strict_mkl

ask_strict_mkl()
