"""A linear called inside a pass on rows the pass does not hold is refused by name (model/dense_rows.py),
not run through the kernel as if it were outside any pass."""

from __future__ import annotations

import pytest
import torch

from galaxy.errors import GalaxyError, RowsOutsidePass
from galaxy.model.dense_rows import ALL, kernel_index, pass_rows, rows_from


def test_rows_past_the_pass_raise_naming_them_and_rows_inside_it_are_routed():
    kernel = torch.tensor([False, False, True, False, True])  # two sequences: rows 2 and 4 run the kernel
    assert kernel_index(7) is ALL  # outside a pass: every row runs the kernel
    with pass_rows(kernel):
        assert kernel_index(5).tolist() == [2, 4]
        with rows_from(3):
            assert kernel_index(2).tolist() == [1]
            with pytest.raises(RowsOutsidePass, match=r"pass rows 3\.\.5, but the pass holds rows 0\.\.4"):
                kernel_index(3)
        with pytest.raises(GalaxyError, match=r"pass rows 0\.\.5"):
            kernel_index(6)
