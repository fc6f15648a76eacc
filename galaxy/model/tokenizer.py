"""Text <-> token ids, over the `tokenizers` library (no `transformers` at run time).

A `Tokenizer` wraps a `tokenizers.Tokenizer` loaded from tokenizer.json or rebuilt from GGUF
metadata, plus what the model needs around it: BOS/EOS ids and the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool = False  # prepend BOS when encoding (Llama-style), unless the post-processor does
    chat_template: str | None = None  # Jinja2 template, as HF and GGUF store it

    @classmethod
    def from_file(cls, path: str | Path, **meta) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)), **meta)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's template (Jinja2, sandboxed)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass a plain prompt instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tok = lambda i: self.backend.id_to_token(i) if i is not None else ""  # noqa: E731
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok(self.bos_token_id),
            eos_token=tok(self.eos_token_id),
        )
