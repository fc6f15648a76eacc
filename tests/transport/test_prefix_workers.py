"""Prefix K/V across placements over real gRPC workers, in a mixed placement (the decode device is
also a prefill device: its worker holds two shards and two pools): repeats of a document move only
the K/V past the blocks the decode pool already holds, with the single-device reference's tokens."""

from __future__ import annotations

import galaxy
from galaxy.runtime.sources import reference_generate
from tests.engine.test_prefix_index import SRC, document


def test_repeats_in_a_mixed_placement_move_only_what_the_decode_pool_lacks():
    ps = document(40, 3)  # 45 tokens each: two 16-token blocks of the document are shared
    with galaxy.connect(local=3) as session:
        lm = session.load(SRC, placement={"placement": "disaggregated", "prefill": [0, 1, 2], "decode": [2]})
        got = [lm.generate(p, 6, details=True) for p in ps]
        whole, rest = (lm.engine.mover.seq_bytes(n) for n in (45, 45 - 32))
        load = lm.engine.load
    assert [g.tokens for g in got] == [reference_generate(SRC, p, 6, stop_at_eos=False) for p in ps]
    assert got[0].handoff.nbytes == whole
    assert all(g.reused_prefix == 32 and g.handoff.nbytes == rest for g in got[1:])
    assert load["decode_leased_tokens"] == 2 * 32
