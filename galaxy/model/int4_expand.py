"""int4pack's weight expanded to the bf16 matrix a dense GEMM multiplies by, in one native pass.

Why: a prompt's rows run a dense bf16 GEMM instead of int4pack's kernel (model/dense_rows.py), which
needs each linear's weight as bf16 once per pass. Done with torch ops (unpack the nibbles, permute the
kernel's layout, scale, add, round: five passes over memory) it cost ~0.65 ns a weight, ~95 ms a pass
for SmolLM2 at 1 thread, which made an 8-token prompt 3.6x slower than on the kernel. Here one C
function reads each packed byte once and writes the two bf16 weights it holds: ~0.12 ns a weight at 1
thread on this host's AVX-512 (docs/decode-formats.md), 2x faster again at 2 threads.

What it computes, per weight: w = (q - 8) * scale + zero in float32, the float32 weight int4pack's
kernel multiplies by ((q - 8) * scale is exact in float32 for a bf16 scale, so the sum is the one
rounding the kernel's fma makes), then rounded to nearest-even bf16 (torch's own rounding, NaN kept
NaN): bit for bit `dequantized().to(bfloat16)` of the weight (tests/model/test_int4_expand.py).
Every weight is computed alone, so the result does not depend on the thread count or on what else a
pass holds.

The layout is torch's (aten's `weight_to_int4pack_kernel`, CPU): each full block of B rows is (K, B/2)
bytes whose byte j holds row j in its low nibble and row B/2 + j in its high one, and a tail of fewer
rows is (K, tail/2) bytes of row pairs (low nibble the even row); B is 64 with AVX-512, 32 with AVX2.
torch built without either (aarch64, the Jetsons: B = 4 x its float vector, 16 with NEON's 4 floats, 32
with 8) packs *every* block as row pairs: the `pairwise` layouts, read with the tail's rule for every
block. Which layout this process's torch packs with is not assumed: `expander()` packs a probe matrix
with torch and keeps the first of LAYOUTS whose expansion equals the probe's own weights, or none.
(The pairwise layouts are tested on x86 against a Python packer of aarch64's rule,
tests/model/test_int4_expand.py; no aarch64 host ran them.)

Building: the C source below is compiled on first use by the machine's C compiler (`$CC`, else `cc`)
into galaxy.paths' native/ cache (`-O3 -march=native -fopenmp`, each dropped in turn if the compiler
refuses it; 60 s at most; named by a hash of the source, the flags, the compiler and the instruction
sets it targets with them (`_target_id`), so an edit, another compiler or another CPU builds anew),
about 1 s, then loaded with ctypes (no torch headers). OpenMP threads come from the libgomp torch itself
loaded (one runtime, one pool). Where no compiler exists, the compile fails, the probe finds no
layout, or `GALAXY_NATIVE=0`, `expander()` is None and int4's prompt rows keep the kernel
(QuantLinear.routes_rows): slower prompts, never a failed load.

Shapes: packed (Npad, K/2) uint8, scale_zero (K/group, Npad, 2) bf16, out W^T (K, Npad) bf16.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..paths import cache_dir

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 60
FLAGS = ("-O3", "-march=native", "-fopenmp")  # dropped from the right while the compiler refuses them
# int4pack's CPU layouts, (row block, pairwise): AVX-512, AVX2, then torch without either (aarch64's NEON
# packs blocks of 16 rows, a wider vector 32, each block as row pairs: aten's weight_to_int4pack_kernel)
LAYOUTS = ((64, False), (32, False), (16, False), (16, True), (32, True))

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

static inline uint16_t bf16_rne(float f) {  /* torch's float -> bfloat16: nearest even, NaN a quiet NaN */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float bf16_f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

#if defined(__AVX512F__) && defined(__AVX512BW__)
static inline __m512i rne16(__m512 w) {  /* 16 floats -> their bf16 in each 32-bit lane's high half */
    __m512i u = _mm512_castps_si512(w);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(w, w, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
}

/* one full block of 64 rows: 32 bytes a column give rows 0-31 (low nibbles) and 32-63 (high) */
static void block64(const uint8_t* p, const uint16_t* sz, uint16_t* out, int64_t npad, int64_t k,
                    int64_t group, int64_t n0) {
    const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);  /* q - 8 */
    uint16_t ix[32];
    for (int i = 0; i < 32; ++i) ix[i] = (uint16_t)(2 * i + 1);  /* the odd (high) halves of two vectors */
    const __m512i high = _mm512_loadu_si512(ix);
    const __m512i zmask = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t g = 0; g < k / group; ++g) {
        const uint16_t* q = sz + (g * npad + n0) * 2;  /* (scale, zero) pairs: one 32-bit lane a row */
        __m512 s[4], z[4];
        for (int i = 0; i < 4; ++i) {
            __m512i v = _mm512_loadu_si512(q + 32 * i);
            s[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            z[i] = _mm512_castsi512_ps(_mm512_and_si512(v, zmask));
        }
        for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) {
            __m256i x = _mm256_loadu_si256((const __m256i*)(p + kk * 32));
            __m256i lo = _mm256_and_si256(x, _mm256_set1_epi8(15));
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), _mm256_set1_epi8(15));
            __m512i c[4] = {_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)),
                            _mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)),
                            _mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)),
                            _mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1))};
            __m512i r[4];
            for (int i = 0; i < 4; ++i)
                r[i] = rne16(_mm512_fmadd_ps(_mm512_permutexvar_ps(c[i], lut), s[i], z[i]));
            uint16_t* o = out + kk * npad + n0;
            _mm512_storeu_si512(o, _mm512_permutex2var_epi16(r[0], high, r[1]));
            _mm512_storeu_si512(o + 32, _mm512_permutex2var_epi16(r[2], high, r[3]));
        }
    }
}
#endif

/* any block: `width` rows from n0, full (byte j: rows j and blk/2 + j) or a tail (row pairs) */
static void block_any(const uint8_t* p, const uint16_t* sz, uint16_t* out, int64_t npad, int64_t k,
                      int64_t group, int64_t n0, int64_t width, int full, int64_t blk) {
    float s[256], z[256];
    int64_t half = blk / 2;
    for (int64_t g = 0; g < k / group; ++g) {
        const uint16_t* q = sz + (g * npad + n0) * 2;
        for (int64_t j = 0; j < width; ++j) { s[j] = bf16_f(q[2 * j]); z[j] = bf16_f(q[2 * j + 1]); }
        for (int64_t kk = g * group; kk < (g + 1) * group; ++kk) {
            uint16_t* o = out + kk * npad + n0;
            const uint8_t* row = p + kk * (width / 2);
            for (int64_t j = 0; j < width / 2; ++j) {
                int64_t a = full ? j : 2 * j, b = full ? half + j : 2 * j + 1;
                o[a] = bf16_rne((float)((row[j] & 15) - 8) * s[a] + z[a]);
                o[b] = bf16_rne((float)((row[j] >> 4) - 8) * s[b] + z[b]);
            }
        }
    }
}

int galaxy_int4_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* pairwise: every block is read as row pairs, a full one too (torch built without AVX2 / AVX-512) */
void galaxy_int4_expand(const uint8_t* packed, const uint16_t* sz, uint16_t* out, int64_t npad, int64_t k,
                        int64_t group, int64_t blk, int pairwise, int threads) {
    int64_t nfull = npad / blk, nb = (npad + blk - 1) / blk;
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1)
    for (int64_t b = 0; b < nb; ++b) {
        int64_t n0 = b * blk, width = b < nfull ? blk : npad - n0;
        const uint8_t* p = packed + n0 * (k / 2);
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if (!pairwise && blk == 64 && width == 64) { block64(p, sz, out, npad, k, group, n0); continue; }
#endif
        block_any(p, sz, out, npad, k, group, n0, width, !pairwise && b < nfull, blk);
    }
}
"""


class Expander:
    """The loaded native function and the layout this process's int4pack packs with: its row block, and
    whether every block is row pairs (`pairwise`)."""

    def __init__(self, lib: ctypes.CDLL, block: int, pairwise: bool = False):
        self.lib, self.block, self.pairwise = lib, block, pairwise
        self.fn = _signature(lib.galaxy_int4_expand)
        # threads only through torch's own OpenMP runtime (a build on another backend would start a second pool)
        self.threaded = bool(lib.galaxy_int4_threaded()) and "OpenMP" in torch.__config__.parallel_info()

    def __call__(self, packed: torch.Tensor, scale_zero: torch.Tensor, k: int, group: int,
                 out: torch.Tensor) -> torch.Tensor:
        """out (K, Npad) bf16 <- W^T of the int4pack weight (`packed` (Npad, K/2) uint8, `scale_zero`
        (K/group, Npad, 2) bf16), at this thread's intra-op thread count."""
        npad = packed.shape[0]
        if (packed.dtype != torch.uint8 or scale_zero.dtype != torch.bfloat16 or out.dtype != torch.bfloat16
                or tuple(packed.shape) != (npad, k // 2) or tuple(scale_zero.shape) != (k // group, npad, 2)
                or tuple(out.shape) != (k, npad) or k % group or npad % 16
                or not (packed.is_contiguous() and scale_zero.is_contiguous() and out.is_contiguous())):
            raise ValueError(f"int4 expansion: packed {tuple(packed.shape)} {packed.dtype}, scale_zero "
                             f"{tuple(scale_zero.shape)} {scale_zero.dtype}, out {tuple(out.shape)} {out.dtype} "
                             f"do not describe one int4pack weight of K = {k}, group {group}")
        threads = torch.get_num_threads() if self.threaded else 1
        self.fn(packed.data_ptr(), scale_zero.data_ptr(), out.data_ptr(), npad, k, group, self.block,
                int(self.pairwise), threads)
        return out


def reference(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) bf16: the weight of codes (N, K) in [0, 15] and scale, zero (N, K/group), as the kernel
    computes it in float32, rounded once to bf16 by torch."""
    w = (codes.to(torch.float32) - 8) * scale.repeat_interleave(group, 1) + zero.repeat_interleave(group, 1)
    return w.to(torch.bfloat16)


def _signature(fn):
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
    return fn


def torch_pack(codes: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8: codes (N, K) int32 in [0, 15] in this process's int4pack layout (torch's packer)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)


def _probe(exp_fn, block: int, pairwise: bool = False, pack=torch_pack) -> bool:
    """Whether expanding with the layout (`block`, `pairwise`) gives back a probe weight `pack` packed:
    112 rows (a block of 64 and a tail of 48; 3 of 32 and a tail of 16; 7 of 16), K = 64 in two groups,
    every code at every position."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 112, 64, 32
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = torch.rand(n, k // group, generator=g).add(0.01).to(torch.bfloat16).to(torch.float32)
    zero = torch.randn(n, k // group, generator=g).to(torch.bfloat16).to(torch.float32)
    packed = pack(codes)
    if tuple(packed.shape) != (n, k // 2):
        return False
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N, 2)
    out = torch.empty(k, n, dtype=torch.bfloat16)
    exp_fn(packed.data_ptr(), sz.data_ptr(), out.data_ptr(), n, k, group, block, int(pairwise), 1)
    return torch.equal(out.T.view(torch.int16), reference(codes, scale, zero, group).view(torch.int16))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _target_id(cc: str, flags: tuple[str, ...]) -> str:
    """The macros `cc` predefines with `flags`: with -march=native they name this CPU's instruction sets
    (__AVX512F__, ...), so a cache another CPU filled (a shared home, a copied image) is never loaded
    here, where its code could hold instructions this CPU lacks (SIGILL, not a fallback)."""
    try:
        return subprocess.run([cc, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(directory: Path | None = None) -> Path | None:
    """The shared library's path, compiled into `directory` (default: the cache's native/) unless an
    identical build is there; None when there is no compiler or no flag set compiles."""
    cc = _compiler()
    if cc is None:
        log.info("int4 expansion: no C compiler ($CC, cc, gcc, clang); int4 prompt rows keep the kernel")
        return None
    directory = Path(directory) if directory is not None else cache_dir("native")
    ident = _compiler_id(cc)
    for n in range(len(FLAGS), 0, -1):
        flags = FLAGS[:n]
        target_id = _target_id(cc, flags)
        digest = hashlib.sha256("\0".join([SOURCE, cc, ident, target_id, *flags]).encode()).hexdigest()[:16]
        target = directory / f"int4_expand-{digest}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
                src, out = Path(tmp) / "int4_expand.c", Path(tmp) / "int4_expand.so"
                src.write_text(SOURCE)
                res = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(out), str(src)],
                                     capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
                if res.returncode == 0 and out.exists():
                    os.replace(out, target)  # atomic: concurrent builders each finish their own file
                    return target
                log.info("int4 expansion: %s %s failed: %s", cc, " ".join(flags), res.stderr.strip()[-400:])
        except (OSError, subprocess.SubprocessError) as e:
            log.info("int4 expansion: %s %s failed: %s", cc, " ".join(flags), e)
    return None


_lock = threading.Lock()
_state: dict[str, Expander | None] = {}


def expander() -> Expander | None:
    """This process's native expansion (built, loaded and probed once), or None: no compiler, no build,
    no layout the probe recognises, or `GALAXY_NATIVE=0`."""
    if "x" in _state:  # asked by every linear call of a prompt pass: no lock once loaded
        return _state["x"]
    with _lock:
        if "x" not in _state:
            _state["x"] = _load()
        return _state["x"]


def _load() -> Expander | None:
    if os.environ.get("GALAXY_NATIVE", "1") == "0":
        return None
    path = build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        layout = layout_of(_signature(lib.galaxy_int4_expand))
    except (OSError, AttributeError, RuntimeError) as e:
        log.info("int4 expansion: %s did not load: %s", path, e)
        return None
    if layout is None:
        log.info("int4 expansion: no layout reproduces this torch's int4pack packing; prompt rows keep the kernel")
        return None
    return Expander(lib, *layout)


def layout_of(exp_fn, pack=torch_pack) -> tuple[int, bool] | None:
    """The first of LAYOUTS whose expansion gives back the probe weight `pack` packed, or None."""
    return next((layout for layout in LAYOUTS if _probe(exp_fn, *layout, pack=pack)), None)
