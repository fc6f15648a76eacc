"""MKL's conditional bitwise reproducibility, asked for before the process's first MKL call.

Why: the serving engine promises a sequence the same tokens in a batch as alone, and formats whose
kernels take bf16 activations (int4, int8, bf16) make that a promise of the same *bits*: a 1e-7
difference in an fp32 value that is then rounded to bf16 becomes a 2^-8 relative step, 1e-2 in the
logits a few layers on, and another greedy token some dozens of tokens later. The one fp32 op of
such a step found to give a row other bits by circumstance was SDPA's CPU flash kernel: each OpenMP
thread works in its own slice of one scratch buffer, MKL's sgemm inside it sums differently at
different alignments, and so a head computed by thread 1 differs from the same head computed by
thread 0 (measured: torch 2.13.0+cpu, MKL 2024.2; a lone decode and the same decode beside others
run with other thread counts -- `parallel/threads.py` picks a step's count by its tokens -- and
their heads land on other threads). `MKL_CBWR=AUTO,STRICT` makes MKL's results independent of
alignment (the fastest code path the CPU has, kept; pinned in tests/engine/test_int4_batched.py).

MKL reads the variable at its first call, so this runs when `galaxy.model` is imported, before any
Galaxy code multiplies anything; a value the user set is kept. It is process-wide: the user's own MKL
calls in a process that imports Galaxy run in the strict mode too (and the processes it starts inherit
the variable). A process that ran an MKL call before importing Galaxy keeps MKL's default, which can no
longer be changed (mkl_cbwr_set then fails): `strict_mkl` says whether the mode is on, and a shard loaded
in a format with bf16 activations logs a warning once when it is not (`warn_unless_strict`,
parallel/compact.compact_shard).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

MKL_CBWR = "AUTO,STRICT"
_STRICT = 0x10000  # mkl_service.h: MKL_CBWR_STRICT, or-ed into the branch


def ask_strict_mkl() -> None:
    """Set MKL_CBWR for this process (and the workers it starts) unless the user set it."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)


def strict_mkl() -> bool | None:
    """Whether MKL runs in strict reproducibility mode; None when it cannot be asked (no MKL symbol)."""
    import torch

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    return bool(get(-1) & _STRICT)  # MKL_CBWR_ALL


_warned: list[bool] = []


def warn_unless_strict(what: str) -> None:
    """Log once per process when MKL is known not to run in strict mode: `what` then does not get the
    same bits in a batch as alone (a greedy token may part some dozens of tokens on)."""
    if _warned or strict_mkl() is not False:
        return
    _warned.append(True)
    log.warning("MKL is not in strict reproducibility mode (this process called MKL before importing galaxy, "
                "or MKL_CBWR=%s): %s may give a sequence other tokens beside others than alone; import galaxy "
                "first, or start the process with MKL_CBWR=%s", os.environ.get("MKL_CBWR"), what, MKL_CBWR)
