"""Is a parallel run right? Its output against the single-device reference (in the same dtype and
weights format), by the rule its wire and weights format allow: exact within FP32_TOLERANCE in fp32 and
in the weights formats whose kernels return float32 (fp16, int4-fp32), within a relative bound in bf16,
in a format whose kernels round each partial sum to bf16 or quantize activations (bf16, int8, int4:
docs/decode-formats.md), or on a lossy wire."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.quant import parse_format
from ..parallel.codec import LOSSY_REL_BOUND

FP32_TOLERANCE = 1e-4  # max abs error of a parallel fp32 run against the single-device reference
BF16_REL_TOLERANCE = 5e-2  # of the output's scale, for a bf16 run against a bf16 reference


@dataclass(frozen=True)
class Check:
    ok: bool
    max_abs_err: float
    max_rel_err: float  # max abs error / the reference's largest magnitude
    tolerance: float  # the bound applied: absolute, or relative when `relative`
    relative: bool  # a lossy wire or bf16: the bound is relative to the output's scale
    top1_agreement: float | None  # causal LMs: rows whose argmax matches the reference's

    def to_dict(self) -> dict:
        out = {"max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err, "check": "pass" if self.ok else "FAIL"}
        out["tolerance_rel" if self.relative else "tolerance"] = self.tolerance
        if self.top1_agreement is not None:
            out["top1_agreement"] = self.top1_agreement
        return out


def exact_format(weights_format: str) -> bool:
    """Whether a split run in this weights format equals the single device to float32 rounding: its
    kernels take and return float32 (fp32, fp16, int4-fp32), so the collectives add the same partial sums."""
    return parse_format(weights_format).act == "fp32"


def check_output(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32,
                 wire: list[list[str]] | None = None, logits: bool = False, weights_format: str = "fp32") -> Check:
    """Compare a parallel output with the single-device reference in the same dtype and weights format.
    A lossy wire format is held to its measured bound (codec.LOSSY_REL_BOUND) relative to the output's
    scale; a weights format that is not exact when split (`exact_format`) to bf16's relative bound; both
    at once to the sum of the two."""
    out, ref = out.float(), ref.float()
    err = float((out - ref).abs().max())
    scale = max(float(ref.abs().max()), 1e-30)
    rel = err / scale
    lossy = {f for row in (wire or []) for f in row} - {"fp32"}
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean()) if logits else None
    exact = dtype == torch.float32 and exact_format(weights_format)
    if lossy:  # a format's own rounding adds to the wire's: the two bounds add (int4 on an int8 wire: 20%)
        bound = max(LOSSY_REL_BOUND[f] for f in lossy) + (0.0 if exact else BF16_REL_TOLERANCE)
        return Check(rel <= bound, err, rel, bound, True, top1)
    tol = FP32_TOLERANCE if exact else BF16_REL_TOLERANCE * scale
    return Check(err <= tol, err, rel, tol, False, top1)
