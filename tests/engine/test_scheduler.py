"""Scheduler: stall-free budgets, admission, preemption, aborts, deadlines, refusals, and a
randomized run checked against every sequence generated alone.

The model is replaced by a fake whose "K/V" at position p is a name for tokens[:p+1] (what the
real K/V depend on), stored in a dict keyed by cache slot. A sequence that read a slot holding
another prefix's K/V -- a wrong block table, a missed copy, a block reused too early -- fails
the check, so the scheduler and block manager are tested for what the model would compute.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, SchedulerConfigError
from galaxy.engine.sequence import FinishReason, InvalidRequest, SamplingParams, SequenceStatus
from galaxy.errors import GalaxyError

VOCAB = 7


def next_token(tokens) -> int:
    """The fake model's greedy choice: a function of the whole sequence so far."""
    return hashlib.blake2b(bytes(tokens), digest_size=2).digest()[0] % VOCAB


def alone(prompt, params: SamplingParams, max_model_len: int) -> list[int]:
    """What the sequence generates with nobody else around."""
    toks = list(prompt)
    while True:
        toks.append(next_token(toks))
        if toks[-1] in params.stop_token_ids or len(toks) - len(prompt) >= params.max_new_tokens:
            return toks[len(prompt) :]
        if len(toks) >= max_model_len:
            return toks[len(prompt) :]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeEngine:
    """Runs plans against the fake model and checks every invariant at every step."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg, self.clock = cfg, Clock()
        self.sched = Scheduler(cfg, self.clock)
        self.kv: dict[int, bytes] = {}  # slot -> name of the prefix whose K/V it holds
        self.plans = []

    def slot(self, item, p: int) -> int:
        bs = self.cfg.block_size
        return item.block_table[p // bs] * bs + p % bs

    def step(self, abort_in_flight=(), prompt_budget=None):
        s, bm = self.sched, self.sched.blocks
        decoders = [q.seq_id for q in s.running if q.num_uncomputed == 1]
        plan = s.schedule(prompt_budget)
        self.plans.append(plan)
        ids = [it.seq_id for it in plan.items]
        assert len(ids) == len(set(ids)), "a sequence twice in one step"
        assert plan.num_tokens <= self.cfg.max_batched_tokens
        assert all(len(it.token_ids) <= self.cfg.chunk for it in plan.items)
        # stall-free: every decoding sequence runs (or lost its blocks, or expired), before any prefill
        for d in decoders:
            assert d in ids or d in plan.preempted or d in plan.finished, f"decode of {d} starved"
        pos = {sid: i for i, sid in enumerate(ids)}
        first_other = min((pos[i] for i in ids if i not in decoders), default=len(ids))
        assert all(pos[d] < first_other for d in decoders if d in pos)
        for src, dst in plan.copies:  # copy on write happens on every device before any write
            for o in range(self.cfg.block_size):
                self.kv[dst * self.cfg.block_size + o] = self.kv.get(src * self.cfg.block_size + o)
        for it in plan.items:
            seq = s.live[it.seq_id]
            toks = seq.token_ids
            assert it.token_ids == tuple(toks[it.start : it.start + len(it.token_ids)])
            for p in range(it.start):  # every cached position holds this sequence's own K/V
                assert self.kv.get(self.slot(it, p)) == bytes(toks[: p + 1]), f"seq {it.seq_id} read wrong K/V at {p}"
            for p in range(it.start, it.start + len(it.token_ids)):
                b = it.block_table[p // self.cfg.block_size]
                assert bm.ref[b] == 1 and bm.name[b] is None, f"seq {it.seq_id} writes into shared block {b}"
                self.kv[self.slot(it, p)] = bytes(toks[: p + 1])
            assert it.logits == (it.start + len(it.token_ids) == len(toks))
        bm.audit(s.live.values())
        for sid in abort_in_flight:  # a client gone while its step runs
            s.abort(sid)
        sampled = {it.seq_id: next_token(s.live[it.seq_id].token_ids) if it.seq_id in s.live else 0
                   for it in plan.items if it.logits}
        s.update(plan, sampled)
        bm.audit(s.live.values())
        self.clock.t += 1.0
        return plan

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("requests did not finish")


def config(**kw) -> SchedulerConfig:
    base = dict(num_blocks=64, block_size=4, max_batched_tokens=16, max_running=8, max_model_len=128)
    return SchedulerConfig(**{**base, **kw})


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(max_batched_tokens=4, max_running=8), "max_batched_tokens=4 is below max_running=8"),
    (dict(num_blocks=8, block_size=4, max_model_len=64), "num_blocks=8 x block_size=4"),
    (dict(chunk_size=32), "chunk_size=32 must be an integer in \\[1, max_batched_tokens=16\\]"),
    (dict(block_size=0), "block_size=0"),
])
def test_config_errors_name_the_field_and_both_numbers(kw, msg):
    with pytest.raises(SchedulerConfigError, match=msg):
        config(**kw)


# -- stall-free batching -----------------------------------------------------------------------
def test_decodes_come_first_and_a_prefill_chunk_fills_the_rest_of_the_budget():
    e = FakeEngine(config(max_batched_tokens=8))
    a = e.sched.add([1, 2, 3], SamplingParams(max_new_tokens=50))
    e.step()  # a's prompt
    b = e.sched.add(list(range(7)) * 3, SamplingParams(max_new_tokens=5))
    plan = e.step()
    assert [(it.seq_id, len(it.token_ids), it.start) for it in plan.items] == [(a.seq_id, 1, 3), (b.seq_id, 7, 0)]
    assert [it.logits for it in plan.items] == [True, False]


def test_a_long_prompt_never_stalls_running_streams():
    e = FakeEngine(config(max_batched_tokens=8))
    streams = [e.sched.add([i + 1, 2], SamplingParams(max_new_tokens=60)) for i in range(3)]
    e.step()
    long = e.sched.add([3] * 100, SamplingParams(max_new_tokens=1))
    starts = []
    while not long.is_finished:
        plan = e.step()
        assert [it.seq_id for it in plan.items[:3]] == [s.seq_id for s in streams]
        starts += [it.start for it in plan.items if it.seq_id == long.seq_id]
    assert starts == list(range(0, 100, 5))  # 5 prompt tokens a step: the budget minus three decodes


def test_a_prompt_budget_caps_prompt_tokens_only_in_steps_that_also_decode():
    e = FakeEngine(config(max_batched_tokens=64))
    asked = []

    def budget(decodes):  # the engine's stall bound: prompt tokens allowed beside `decodes` decodes
        asked.append(decodes)
        return 2 * decodes

    a = e.sched.add([1] * 40, SamplingParams(max_new_tokens=30))
    plan = e.step(prompt_budget=budget)  # nobody decodes: the whole budget, and the bound is not asked
    assert [len(it.token_ids) for it in plan.items] == [40] and asked == []
    b = e.sched.add([2] * 40, SamplingParams(max_new_tokens=1))
    sizes = []
    while not b.is_finished:
        plan = e.step(prompt_budget=budget)
        assert plan.items[0].seq_id == a.seq_id and len(plan.items[0].token_ids) == 1
        sizes += [len(it.token_ids) for it in plan.items if it.seq_id == b.seq_id]
    assert sizes == [2] * 20 and set(asked) == {1}


def test_chunk_size_caps_one_prompt_and_lets_a_second_prompt_share_the_step():
    e = FakeEngine(config(max_batched_tokens=16, chunk_size=6))
    a = e.sched.add([1] * 20, SamplingParams(max_new_tokens=2))
    b = e.sched.add([2] * 20, SamplingParams(max_new_tokens=2))
    plan = e.step()
    assert [(it.seq_id, len(it.token_ids)) for it in plan.items] == [(a.seq_id, 6), (b.seq_id, 6)]


# -- memory ------------------------------------------------------------------------------------
def test_admission_waits_for_blocks_first_come_first_served():
    e = FakeEngine(config(num_blocks=10, block_size=4, max_model_len=40, max_batched_tokens=64))
    a = e.sched.add([1] * 30, SamplingParams(max_new_tokens=2))  # 8 blocks
    b = e.sched.add([2] * 12, SamplingParams(max_new_tokens=2))  # 3 blocks: must wait
    c = e.sched.add([3] * 2, SamplingParams(max_new_tokens=2))  # would fit, but arrived after b
    plan = e.step()
    assert [it.seq_id for it in plan.items] == [a.seq_id]
    assert b.status is SequenceStatus.WAITING and c.status is SequenceStatus.WAITING
    e.run()
    assert [s.generated for s in (a, b, c)] == [alone(s.token_ids[: s.num_prompt], s.params, 40) for s in (a, b, c)]


def test_when_blocks_run_out_the_youngest_is_preempted_and_resumes_by_recompute():
    cfg = config(num_blocks=6, block_size=2, max_model_len=12, max_batched_tokens=16, prefix_caching=False)
    e = FakeEngine(cfg)
    old = e.sched.add([1, 2, 3], SamplingParams(max_new_tokens=8))
    young = e.sched.add([4, 5, 6], SamplingParams(max_new_tokens=8))
    preempted_at = None
    while e.sched.has_unfinished():
        plan = e.step()
        if young.seq_id in plan.preempted and preempted_at is None:
            preempted_at = plan.step
            assert young.status is SequenceStatus.PREEMPTED and young.block_table == []
            assert old.seq_id in [it.seq_id for it in plan.items]
    assert preempted_at is not None and old.num_preemptions == 0 and young.num_preemptions >= 1
    resumed = [it for p in e.plans[preempted_at + 1 :] for it in p.items if it.seq_id == young.seq_id]
    assert resumed[0].start == 0 and len(resumed[0].token_ids) > young.num_prompt  # prompt + generated again
    for s in (old, young):
        assert s.finish_reason is FinishReason.LENGTH
        assert s.generated == alone(s.token_ids[: s.num_prompt], s.params, 12)


def test_requests_with_a_common_prefix_share_its_blocks():
    e = FakeEngine(config())
    system = list(range(1, 7)) * 2  # 12 tokens: three full blocks
    first = e.sched.add(system + [1], SamplingParams(max_new_tokens=3))
    e.step()
    second = e.sched.add(system + [2, 3], SamplingParams(max_new_tokens=3))
    plan = e.step()
    item = next(it for it in plan.items if it.seq_id == second.seq_id)
    assert item.start == 12 and item.block_table[:3] == tuple(first.block_table[:3])
    assert e.sched.blocks.stats.hit_tokens == 12
    e.run()
    assert second.generated == alone(system + [2, 3], second.params, 128)


def test_a_repeated_prompt_copies_its_last_block_and_runs_one_token():
    e = FakeEngine(config())
    prompt = list(range(1, 9))  # two full blocks
    first = e.sched.add(prompt, SamplingParams(max_new_tokens=1))
    e.run()
    again = e.sched.add(prompt, SamplingParams(max_new_tokens=2))
    plan = e.step()
    assert len(plan.copies) == 1 and [(it.start, len(it.token_ids)) for it in plan.items] == [(7, 1)]
    e.run()
    assert again.generated == alone(prompt, again.params, 128) and first.generated == again.generated[:1]


# -- requests that end early, and refusals -----------------------------------------------------
def test_abort_frees_the_blocks_at_once():
    e = FakeEngine(config())
    a = e.sched.add([1] * 10, SamplingParams(max_new_tokens=50))
    e.step()
    free_before = e.sched.blocks.num_free
    assert e.sched.abort(a.seq_id)
    assert e.sched.blocks.num_free == free_before + 3
    assert a.finish_reason is FinishReason.ABORT and not e.sched.has_unfinished()
    assert not e.sched.abort(a.seq_id)


def test_a_sequence_aborted_while_its_step_runs_is_skipped_and_the_others_carry_on():
    e = FakeEngine(config())
    a = e.sched.add([1, 2], SamplingParams(max_new_tokens=4))
    b = e.sched.add([3, 4], SamplingParams(max_new_tokens=4))
    e.step(abort_in_flight=[a.seq_id])
    assert a.generated == [] and a.finish_reason is FinishReason.ABORT
    e.run()
    assert b.generated == alone([3, 4], b.params, 128)


def test_a_deadline_ends_the_sequence_at_the_next_step():
    e = FakeEngine(config())
    slow = e.sched.add([1, 2], SamplingParams(max_new_tokens=100), timeout=3.5)
    other = e.sched.add([3, 4], SamplingParams(max_new_tokens=6))
    finished_in = [p.step for p in (e.step() for _ in range(5)) if slow.seq_id in p.finished]
    assert finished_in == [4] and slow.finish_reason is FinishReason.DEADLINE and len(slow.generated) == 4
    e.run()
    assert other.generated == alone([3, 4], other.params, 128)


def test_the_waiting_queue_is_bounded():
    e = FakeEngine(config(max_waiting=2))
    e.sched.add([1])
    e.sched.add([2])
    with pytest.raises(QueueFull, match="max_waiting=2"):
        e.sched.add([3])
    assert len(e.sched.waiting) == 2


@pytest.mark.parametrize("prompt,params,timeout,msg", [
    ([], None, None, "empty"),
    ([1, VOCAB], None, None, "outside"),
    ([1, -2], None, None, "outside"),
    ([1] * 128, None, None, "max_model_len=128"),
    ([1], None, 0.0, "timeout"),
])
def test_bad_input_is_refused_without_disturbing_the_others(prompt, params, timeout, msg):
    def plans(bad: bool):
        e = FakeEngine(config(vocab_size=VOCAB))
        a = e.sched.add([1, 2, 3], SamplingParams(max_new_tokens=5))
        e.step()
        if bad:
            with pytest.raises(InvalidRequest, match=msg):
                e.sched.add(prompt, params, timeout)
        e.run()
        return [(p.items, p.copies) for p in e.plans], a.generated

    assert plans(bad=True) == plans(bad=False)


def test_bad_sampling_params_are_refused():
    with pytest.raises(InvalidRequest, match="max_new_tokens=0"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(-1,))


def test_a_stop_token_ends_the_sequence():
    prompt = [1, 2, 3]
    first = next_token(prompt)
    e = FakeEngine(config())
    s = e.sched.add(prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(first,)))
    e.run()
    assert s.generated == [first] and s.finish_reason is FinishReason.STOP


def test_schedule_and_update_must_alternate():
    e = FakeEngine(config())
    e.sched.add([1, 2])
    plan = e.sched.schedule()
    with pytest.raises(GalaxyError, match="before update"):
        e.sched.schedule()
    e.sched.update(plan, {plan.items[0].seq_id: 3})
    with pytest.raises(GalaxyError, match="once"):
        e.sched.update(plan, {})


def test_plan_packs_tokens_in_item_order_and_marks_the_rows_to_sample():
    e = FakeEngine(config(max_batched_tokens=16, block_size=4))
    a = e.sched.add([1, 2, 3], SamplingParams(max_new_tokens=5))
    e.step()
    e.sched.add([4, 5, 6, 1, 2], SamplingParams(max_new_tokens=5))
    plan = e.sched.schedule()
    assert plan.token_ids() == [a.token_ids[3], 4, 5, 6, 1, 2]
    assert plan.logit_rows() == [0, 5] and plan.num_tokens == 6


# -- randomized ----------------------------------------------------------------------------------
request = st.tuples(
    st.integers(0, 12),  # arrival step
    st.sampled_from([(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 1, 2)]),  # shared system prompts
    st.one_of(st.just([]), st.lists(st.integers(1, 3), max_size=10)),  # own suffix; small alphabet: accidental sharing
    st.integers(1, 12),  # max_new_tokens
    st.sampled_from([(), (0,)]),  # stop tokens
    st.one_of(st.none(), st.integers(1, 30)),  # abort at step
    st.one_of(st.none(), st.floats(0.5, 25)),  # timeout
)


@settings(max_examples=120, deadline=None)
@given(
    reqs=st.lists(request, min_size=1, max_size=14),
    block_size=st.sampled_from([1, 2, 4]),
    spare_blocks=st.integers(0, 12),
    budget=st.integers(4, 24),
    chunk=st.one_of(st.none(), st.integers(1, 6)),
    caching=st.booleans(),
    max_waiting=st.integers(1, 14),
    seed=st.integers(0, 2**16),
)
def test_random_traffic_keeps_every_invariant_and_matches_each_sequence_alone(
        reqs, block_size, spare_blocks, budget, chunk, caching, max_waiting, seed):
    max_model_len = 24
    cfg = SchedulerConfig(num_blocks=-(-max_model_len // block_size) + spare_blocks, block_size=block_size,
                          max_batched_tokens=budget, chunk_size=chunk if chunk is None else min(chunk, budget),
                          max_running=4, max_waiting=max_waiting, max_model_len=max_model_len,
                          vocab_size=VOCAB, prefix_caching=caching)
    e, rnd = FakeEngine(cfg), random.Random(seed)
    accepted, refused, aborts = {}, 0, {}
    for step in range(10_000):
        for arrival, system, suffix, max_new, stop, abort_at, timeout in reqs:
            if arrival != step:
                continue
            prompt = list(system) + suffix
            try:
                s = e.sched.add(prompt, SamplingParams(max_new_tokens=max_new, stop_token_ids=stop), timeout)
            except InvalidRequest:
                assert not prompt or len(prompt) >= max_model_len
                refused += 1
                continue
            except QueueFull:
                assert len(e.sched.waiting) >= max_waiting
                refused += 1
                continue
            accepted[s.seq_id] = (s, timeout)
            if abort_at is not None:
                aborts.setdefault(step + abort_at, []).append(s.seq_id)
        if step > 12 and not e.sched.has_unfinished():
            break
        for sid in aborts.pop(step, []):
            e.sched.abort(sid)
        in_flight = [sid for sid in aborts.get(step + 1, []) if rnd.random() < 0.5]
        e.step(abort_in_flight=in_flight)
        for sid in in_flight:
            aborts[step + 1].remove(sid)
    else:
        raise AssertionError("requests did not finish")
    assert e.sched.blocks.num_free == cfg.num_blocks and not e.sched.waiting and not e.sched.running
    for s, timeout in accepted.values():
        assert s.status is SequenceStatus.FINISHED
        if s.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            assert s.generated == alone(s.token_ids[: s.num_prompt], s.params, max_model_len)
        elif s.finish_reason is FinishReason.DEADLINE:
            assert timeout is not None
        else:
            assert s.finish_reason is FinishReason.ABORT
        assert s.generated == alone(s.token_ids[: s.num_prompt], s.params, max_model_len)[: len(s.generated)]


def test_heavy_traffic_on_a_tiny_pool_preempts_resumes_and_finishes_everything():
    cfg = SchedulerConfig(num_blocks=8, block_size=2, max_batched_tokens=8, chunk_size=3, max_running=4,
                          max_waiting=64, max_model_len=16, vocab_size=VOCAB)
    e, rnd = FakeEngine(cfg), random.Random(7)
    seqs = []
    for _ in range(40):
        prompt = [1, 2, 3, 4][: rnd.randint(0, 4)] + [rnd.randint(1, 3) for _ in range(rnd.randint(1, 8))]
        seqs.append(e.sched.add(prompt, SamplingParams(max_new_tokens=rnd.randint(1, 7))))
    e.run()
    assert e.sched.num_preemptions > 0 and e.sched.blocks.stats.hit_tokens > 0
    for s in seqs:
        assert s.generated == alone(s.token_ids[: s.num_prompt], s.params, 16)
    assert any(s.num_preemptions for s in seqs)
