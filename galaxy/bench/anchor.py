"""The anchor: llama.cpp on the same GGUF file and thread count, timed the way Galaxy is timed.

A user who wants one device's decode speed would run llama.cpp on the GGUF file, so that is the
figure Galaxy's decode is judged against. This module times llama.cpp through llama-cpp-python
(an optional extra: `pip install llama-cpp-python`, which compiles llama.cpp from source in about
five minutes; nothing else in Galaxy needs it) on token ids Galaxy supplies, so both sides run
exactly the same tokens:

- decode: greedy from a prompt, each one-token `eval` timed; the median ms per token of a run;
- prefill: one `eval` of a longer prompt into an empty cache, as one batch; seconds.

llama-cpp-python is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..errors import GalaxyError

INSTALL_HINT = "pip install 'galaxy-edge[anchor]' (llama-cpp-python: compiles llama.cpp from source, about 5 minutes)"


class AnchorUnavailable(GalaxyError):
    """llama-cpp-python is not installed, so the llama.cpp anchor cannot be measured."""


def available() -> bool:
    """Whether llama-cpp-python can be imported (the anchor is optional)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """One llama.cpp model with a fixed thread count (used for generation and batches alike)."""

    def __init__(self, path: str | Path, threads: int, n_ctx: int = 1024, logits_all: bool = False):
        try:
            import llama_cpp
        except ImportError as e:
            raise AnchorUnavailable(f"the llama.cpp anchor needs llama-cpp-python ({e}); {INSTALL_HINT}") from e
        self.threads, self.n_ctx = threads, n_ctx
        self.engine = f"llama.cpp (llama-cpp-python {getattr(llama_cpp, '__version__', '?')})"
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=n_ctx, n_ubatch=n_ctx, seed=0, verbose=False, logits_all=logits_all)

    def _next(self) -> int:
        """Greedy choice from the last evaluated token's logits (llama-cpp-python keeps no copy of
        them without logits_all, so they are read from the context)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def decode(self, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens after the prompt, and the seconds of each one-token step."""
        if len(prompt_ids) + new_tokens > self.n_ctx:
            raise GalaxyError(f"prompt ({len(prompt_ids)}) + {new_tokens} tokens exceed n_ctx={self.n_ctx}")
        self.llm.reset()  # the next eval overwrites the cache from position 0
        self.llm.eval(prompt_ids)
        tok, out, steps = self._next(), [], []
        for _ in range(new_tokens):
            out.append(tok)
            t0 = time.perf_counter()
            self.llm.eval([tok])
            steps.append(time.perf_counter() - t0)
            tok = self._next()
        return out, steps

    def prefill(self, ids: list[int]) -> float:
        """Seconds to evaluate `ids` into an empty cache (one batch)."""
        if len(ids) > self.n_ctx:
            raise GalaxyError(f"prefill of {len(ids)} tokens exceeds n_ctx={self.n_ctx}")
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def all_logits(self, ids: list[int]):
        """Every position's logits (T, V) as a float32 numpy array (needs logits_all=True): llama.cpp's own
        accuracy against a reference forward."""
        if not self.llm._logits_all:
            raise GalaxyError("all_logits needs a LlamaCpp opened with logits_all=True")
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)].copy()

    def close(self) -> None:
        self.llm.close()


def llama_cpp_timings(path: str | Path, threads: int, prompt_ids: list[int], prefill_ids: list[int],
                      new_tokens: int = 64, reps: int = 3) -> dict:
    """Time llama.cpp on `path` with `threads` threads, `reps` runs each of decode and prefill.

    Returns {"engine", "threads", "decode_ms" (median over runs of each run's median step),
    "decode_ms_runs", "prefill_s" (median), "prefill_tokens", "greedy_ids" (new tokens)}.
    """
    if not prompt_ids or not prefill_ids:
        raise GalaxyError("llama_cpp_timings needs a non-empty prompt and prefill")
    llm = LlamaCpp(path, threads, n_ctx=max(len(prompt_ids) + new_tokens, len(prefill_ids)) + 8)
    try:
        runs, prefill, greedy = [], [], None
        for _ in range(reps):
            ids, steps = llm.decode(prompt_ids, new_tokens)
            greedy = greedy or ids
            runs.append(statistics.median(steps) * 1e3)
            prefill.append(llm.prefill(prefill_ids))
    finally:
        llm.close()
    return {"engine": llm.engine, "threads": threads, "decode_ms": statistics.median(runs), "decode_ms_runs": runs,
            "prefill_s": statistics.median(prefill), "prefill_tokens": len(prefill_ids), "greedy_ids": greedy}
