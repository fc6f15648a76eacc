"""Is a parallel run right? Its output against the single-device reference, by the rule its wire
format allows: exact within FP32_TOLERANCE in fp32, within a relative bound in bf16 or on a lossy wire."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def check_output(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32,
                 wire: list[list[str]] | None = None, logits: bool = False) -> Check:
    """Compare a parallel output with the single-device reference in the same dtype. A lossy wire
    format is held to its measured bound (codec.LOSSY_REL_BOUND) relative to the output's scale."""
    out, ref = out.float(), ref.float()
    err = float((out - ref).abs().max())
    scale = max(float(ref.abs().max()), 1e-30)
    rel = err / scale
    lossy = {f for row in (wire or []) for f in row} - {"fp32"}
    top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean()) if logits else None
    if lossy:
        bound = max(LOSSY_REL_BOUND[f] for f in lossy)
        return Check(rel <= bound, err, rel, bound, True, top1)
    tol = FP32_TOLERANCE if dtype == torch.float32 else BF16_REL_TOLERANCE * scale
    return Check(err <= tol, err, rel, tol, False, top1)
