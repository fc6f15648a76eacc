"""`--check`'s rule (runtime/check.py): a lossy wire's measured bound, a non-exact weights format's bf16
bound, and both at once their sum -- a format's own rounding adds to the wire's."""

from __future__ import annotations

import torch

from galaxy.parallel.codec import LOSSY_REL_BOUND
from galaxy.runtime.check import BF16_REL_TOLERANCE, FP32_TOLERANCE, check_output

REF = torch.linspace(-10.0, 10.0, 97).reshape(1, 97)
INT8_WIRE = [["fp32", "int8"], ["int8", "fp32"]]


def _off_by(rel: float) -> torch.Tensor:
    out = REF.clone()
    out[0, 0] += rel * 10.0  # the reference's scale is 10
    return out


def test_an_exact_format_on_a_lossy_wire_is_held_to_the_wires_bound():
    c = check_output(_off_by(0.14), REF, wire=INT8_WIRE)
    assert c.ok and c.relative and c.tolerance == LOSSY_REL_BOUND["int8"]
    assert not check_output(_off_by(0.16), REF, wire=INT8_WIRE).ok


def test_int4_on_a_lossy_wire_is_held_to_the_sum_of_both_bounds():
    bound = LOSSY_REL_BOUND["int8"] + BF16_REL_TOLERANCE
    c = check_output(_off_by(0.1524), REF, wire=INT8_WIRE, weights_format="int4")  # measured on the emulated LAN
    assert c.ok and c.tolerance == bound
    assert not check_output(_off_by(bound + 0.01), REF, wire=INT8_WIRE, weights_format="int4").ok


def test_fp32_without_a_lossy_wire_stays_exact():
    assert check_output(REF + FP32_TOLERANCE / 2, REF).ok
    assert not check_output(REF + FP32_TOLERANCE * 2, REF).ok
