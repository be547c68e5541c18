"""Scheduling policy: round-robin across adapters and clients (no starvation), KV admission, token budget,
chunked prefill, and preemption when a decoding request needs a block the pool does not have."""

from __future__ import annotations

from collections import Counter

from longtail.serving.sampling import SamplingParams
from longtail.serving.scheduler import Request, Scheduler, State


def request(i, adapter, prompt=4, max_tokens=4, client=None):
    return Request(i, [1] * prompt, adapter, SamplingParams(max_tokens=max_tokens), client=client)


def admit(scheduler, blocks_free=10_000, ready=lambda a: True):
    """One scheduling step, applied as the engine would: admitted requests run, chunks advance."""
    plan = scheduler.schedule(blocks_free, lambda r: 1, ready)
    for r in plan.decode:
        r.cached += 1
    for r, chunk in plan.prefill:
        if r.state is State.WAITING:
            r.state = State.RUNNING
            scheduler.running.append(r)
        r.cached += chunk
    return plan


def test_a_rare_adapter_is_not_starved_by_a_popular_one():
    scheduler = Scheduler(max_batch_tokens=8, max_running=100)
    for i in range(50):
        scheduler.add(request(i, "popular"))
    scheduler.add(request(100, "rare"))
    first = [r.adapter_id for r, _ in admit(scheduler).prefill]
    assert first == ["popular", "rare"], "one admission per adapter queue per pass"


def test_admission_share_is_equal_across_backlogged_adapters():
    scheduler = Scheduler(max_batch_tokens=4, max_running=1000)  # one 4-token prompt per step
    for i in range(60):
        scheduler.add(request(i, "popular"))
    for i in range(10):
        scheduler.add(request(100 + i, "rare-a"))
        scheduler.add(request(200 + i, "rare-b"))
    served = Counter()
    for _ in range(15):
        plan = admit(scheduler)
        served.update(r.adapter_id for r, _ in plan.prefill)
        scheduler.running.clear()
    assert served == Counter({"popular": 5, "rare-a": 5, "rare-b": 5})


def test_a_flooding_client_does_not_starve_another_client_of_the_same_adapter():
    scheduler = Scheduler(max_batch_tokens=4, max_running=1000)
    for i in range(20):
        scheduler.add(request(i, "a", client="flood"))
    scheduler.add(request(99, "a", client="polite"))
    order = []
    for _ in range(3):
        order += [r.client for r, _ in admit(scheduler).prefill]
        scheduler.running.clear()
    assert order[:2] == ["flood", "polite"]
    assert order[2] == "flood", "FCFS per client, round-robin between clients"


def test_kv_pool_and_running_cap_bound_admission():
    scheduler = Scheduler(max_batch_tokens=1000, max_running=3)
    for i in range(10):
        scheduler.add(request(i, None))
    assert len(admit(scheduler, blocks_free=2).prefill) == 2
    plan = admit(scheduler)
    assert len(plan.decode) == 2 and len(plan.prefill) == 1  # running cap: 2 running + 1


def test_requests_wait_while_their_adapter_loads():
    scheduler = Scheduler(max_batch_tokens=100, max_running=10)
    scheduler.add(request(1, "cold"))
    scheduler.add(request(2, "hot"))
    plan = admit(scheduler, ready=lambda a: a != "cold")
    assert [r.request_id for r, _ in plan.prefill] == [2]
    assert scheduler.waiting() == 1
    plan = admit(scheduler)
    assert [r.request_id for r in plan.decode] == [2], "the running request decodes meanwhile"
    assert [r.request_id for r, _ in plan.prefill] == [1]


def test_decode_tokens_count_against_the_step_budget():
    scheduler = Scheduler(max_batch_tokens=6, max_running=10)
    scheduler.add(request(1, None, prompt=4))
    admit(scheduler)
    scheduler.add(request(2, None, prompt=4))
    scheduler.add(request(3, None, prompt=4))
    plan = admit(scheduler)
    # 1 decode + 4 prompt tokens leave 1: too small a first chunk for request 3.
    assert len(plan.decode) == 1 and [r.request_id for r, _ in plan.prefill] == [2]


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode():
    scheduler = Scheduler(max_batch_tokens=64, max_running=10, min_prefill_chunk=16)
    scheduler.add(request(1, None, prompt=8))
    admit(scheduler)
    long = request(2, "a", prompt=150)
    scheduler.add(long)
    chunks = []
    while not long.prefilled:
        plan = admit(scheduler)
        assert len(plan.decode) + sum(n for _, n in plan.prefill) <= 64
        assert any(r.request_id == 1 for r in plan.decode), "the short request decodes every step"
        chunks += [n for r, n in plan.prefill if r is long]
    assert chunks == [63, 63, 24]
    assert long in admit(scheduler).decode


def background(i, arrival, prompt=4):
    return Request(i, [1] * prompt, None, SamplingParams(max_tokens=1), client="credit", arrival=arrival,
                   background=True)


def test_background_work_joins_steps_that_run_anyway_and_waits_while_the_engine_idles():
    """Adapter-credit scoring must not start a step of its own right after answers leave (it would take the
    CPU from the node's receipts), nor take budget that answers need; after an idle wait it runs alone."""
    now = [100.0]
    scheduler = Scheduler(max_batch_tokens=8, max_running=10, background_idle_seconds=0.02, clock=lambda: now[0])
    scheduler.add(background(1, arrival=100.0))
    assert admit(scheduler).prefill == [], "idle engine, fresh background request: wait"
    now[0] = 100.019
    assert admit(scheduler).prefill == []
    scheduler.add(request(2, "a", prompt=6))
    plan = admit(scheduler)
    assert [(r.request_id, n) for r, n in plan.prefill] == [(2, 6)], "the answer first; 2 tokens left, under 4"
    now[0] = 100.5
    scheduler.add(background(3, arrival=100.5))
    plan = admit(scheduler)  # request 2 still prefills nothing (done) but decodes: the step runs anyway
    assert [r.request_id for r in plan.decode] == [2]
    assert [r.request_id for r, _ in plan.prefill] == [1], "FCFS: the oldest background request first"
    scheduler.running.clear()
    assert admit(scheduler).prefill == [], "request 3 is fresh and nothing else runs"
    now[0] = 100.53
    assert [r.request_id for r, _ in admit(scheduler).prefill] == [3], "after the idle wait it runs alone"


def test_background_requests_count_as_waiting_and_can_be_withdrawn():
    scheduler = Scheduler(max_batch_tokens=8, max_running=10)
    waiting = background(1, arrival=0.0)
    scheduler.add(waiting)
    assert scheduler.waiting() == 1 and scheduler.waiting_requests() == [waiting]
    assert scheduler.remove_waiting(waiting) and not scheduler.remove_waiting(waiting)
    assert scheduler.waiting() == 0


def decoding(scheduler, *requests, blocks=1):
    """Requests running and past their prompt, holding `blocks` blocks each, in admission order."""
    for r in requests:
        r.state, r.cached, r.blocks = State.RUNNING, len(r.prompt_ids), list(range(blocks))
        r.output_ids = [7]
        scheduler.running.append(r)


def test_a_decoding_request_short_of_a_block_preempts_the_most_recently_admitted():
    scheduler = Scheduler(max_batch_tokens=100, max_running=10)
    old, middle, young = request(1, None), request(2, "a"), request(3, "a")
    decoding(scheduler, old, middle, young, blocks=2)
    waiting = request(4, "a")
    scheduler.add(waiting)
    grow = {1: 1, 2: 0, 3: 0}  # only the oldest crosses a block boundary this step
    plan = scheduler.schedule(0, lambda r: 1, lambda a: True, lambda r: grow[r.request_id])
    assert plan.preempted == [young] and scheduler.running == [old, middle]
    assert plan.decode == [old, middle] and plan.prefill == [], "nothing is admitted in a step that preempted"
    assert young.state is State.WAITING and young.cached == 0 and young.preemptions == 1
    assert young.prefill_len == 4 + 1, "its prompt and the token it generated are prefilled again"
    assert young.prefill_tokens(0, 5) == [1, 1, 1, 1, 7]
    assert scheduler.waiting_requests() == [young, waiting], "back at the head of its queue"
    assert young.blocks == [0, 1], "the engine, not the scheduler, returns its blocks to the pool"


def test_preemption_takes_as_many_as_needed_and_the_asking_request_itself_when_it_is_the_youngest():
    scheduler = Scheduler(max_batch_tokens=100, max_running=10)
    a, b, c = request(1, None), request(2, None), request(3, None)
    decoding(scheduler, a, b, c, blocks=1)
    c.blocks = []  # it holds nothing: preempting it frees no block, so b must go too
    plan = scheduler.schedule(0, lambda r: 1, lambda adapter: True, lambda r: 1)
    # a needs 1: c (0 blocks) then b (1 block) are preempted; a's block comes from b.
    assert plan.preempted == [c, b] and plan.decode == [a]
    assert scheduler.waiting_requests() == [b, c], "the older preempted request resumes first"
    scheduler.running.clear()
    lone = request(9, None)
    decoding(scheduler, a, lone, blocks=1)
    plan = scheduler.schedule(0, lambda r: 1, lambda adapter: True, lambda r: 1 if r is lone else 0)
    assert plan.preempted == [lone] and plan.decode == [a], "the youngest, short itself, gives way to the older"


def test_growth_within_the_free_blocks_preempts_nobody_and_leaves_the_rest_to_admission():
    scheduler = Scheduler(max_batch_tokens=100, max_running=10)
    a, b = request(1, None), request(2, None)
    decoding(scheduler, a, b)
    scheduler.add(request(3, None))
    scheduler.add(request(4, None))
    plan = scheduler.schedule(3, lambda r: 1, lambda adapter: True, lambda r: 1)  # 2 for growth, 1 to admit
    assert plan.preempted == [] and plan.decode == [a, b]
    assert [r.request_id for r, _ in plan.prefill] == [3]


def test_a_preempted_background_request_waits_at_the_head_of_the_background_queue():
    scheduler = Scheduler(max_batch_tokens=100, max_running=10)
    a = request(1, None)
    scoring = background(2, arrival=0.0, prompt=40)
    decoding(scheduler, a)
    scoring.state, scoring.cached, scoring.blocks = State.RUNNING, 16, [5, 6, 7]
    scheduler.running.append(scoring)
    later = background(3, arrival=0.0)
    scheduler.add(later)
    plan = scheduler.schedule(0, lambda r: 1, lambda adapter: True, lambda r: 1 if r is a else 0)
    assert plan.preempted == [scoring] and list(scheduler.background) == [scoring, later]
    assert scoring.cached == 0 and scoring.prefill_len == 40


def test_newcomers_do_not_take_the_blocks_a_preempted_request_waits_for():
    scheduler = Scheduler(max_batch_tokens=100, max_running=10)
    preempted, newcomer = request(1, "a", prompt=40), request(2, "b")
    preempted.preemptions = 1
    scheduler.add(preempted)
    scheduler.add(newcomer)
    need = {1: 3, 2: 1}
    plan = scheduler.schedule(2, lambda r: need[r.request_id], lambda adapter: True)
    assert plan.prefill == [], "2 free blocks: too few for the preempted request, and held for it"
    plan = scheduler.schedule(3, lambda r: need[r.request_id], lambda adapter: True)
    assert [r.request_id for r, _ in plan.prefill] == [1]
    fresh = Scheduler(max_batch_tokens=100, max_running=10)
    fresh.add(request(1, "a", prompt=40))
    fresh.add(request(2, "b"))
    assert [r.request_id for r, _ in fresh.schedule(2, lambda r: need[r.request_id], lambda a: True).prefill] == \
        [2], "a request never preempted holds nothing for itself: the next queue's head is admitted"


def test_a_preempted_request_prefills_its_prompt_then_its_output_in_any_chunks():
    r = Request(1, [10, 11, 12], None, SamplingParams(max_tokens=8))
    r.output_ids = [20, 21, 22]
    r.preempt()
    assert r.prefill_len == 6 and not r.prefilled
    whole = [10, 11, 12, 20, 21, 22]
    for start in range(6):
        for stop in range(start, 7):
            assert r.prefill_tokens(start, stop) == whole[start:stop]
    r.output_ids.append(23)  # sampled from the recomputed prefill's last row: not part of the prefill
    assert r.prefill_tokens(0, 6) == whole and r.prefill_len == 6
