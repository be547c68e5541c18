"""Scheduling policy: round-robin across adapters (no starvation), KV admission, token budget."""

from __future__ import annotations

from serving.sampling import SamplingParams
from serving.scheduler import Request, Scheduler, State


def request(i, adapter, prompt=4, max_tokens=4):
    return Request(i, [1] * prompt, adapter, SamplingParams(max_tokens=max_tokens))


def admit(scheduler, blocks_free=10_000, ready=lambda a: True):
    plan = scheduler.schedule(blocks_free, lambda r: 1, ready)
    for r in plan.prefill:
        r.state = State.RUNNING
        scheduler.running.append(r)
    return plan


def test_a_rare_adapter_is_not_starved_by_a_popular_one():
    scheduler = Scheduler(max_batch_tokens=8, max_running=100)
    for i in range(50):
        scheduler.add(request(i, "popular"))
    scheduler.add(request(100, "rare"))
    admitted = [r.adapter_id for r in admit(scheduler).prefill]
    assert "rare" in admitted[:2], admitted


def test_round_robin_rotates_between_steps():
    scheduler = Scheduler(max_batch_tokens=4, max_running=100)
    for i in range(6):
        scheduler.add(request(i, "a"))
        scheduler.add(request(10 + i, "b"))
        scheduler.add(request(20 + i, None))
    firsts = []
    for _ in range(6):
        plan = admit(scheduler)
        firsts.append(plan.prefill[0].adapter_id)
        scheduler.running.clear()
    assert set(firsts) == {"a", "b", None}


def test_kv_pool_and_running_cap_bound_admission():
    scheduler = Scheduler(max_batch_tokens=1000, max_running=3)
    for i in range(10):
        scheduler.add(request(i, None))
    assert len(admit(scheduler, blocks_free=2).prefill) == 2
    assert len(admit(scheduler).prefill) == 1  # running cap: 2 running + 1


def test_requests_wait_while_their_adapter_loads():
    scheduler = Scheduler(max_batch_tokens=100, max_running=10)
    scheduler.add(request(1, "cold"))
    scheduler.add(request(2, "hot"))
    plan = admit(scheduler, ready=lambda a: a != "cold")
    assert [r.request_id for r in plan.prefill] == [2]
    assert scheduler.waiting() == 1
    assert [r.request_id for r in admit(scheduler).prefill] == [1]


def test_decode_tokens_count_against_the_step_budget():
    scheduler = Scheduler(max_batch_tokens=6, max_running=10)
    scheduler.add(request(1, None, prompt=4))
    admit(scheduler)
    scheduler.add(request(2, None, prompt=4))
    scheduler.add(request(3, None, prompt=4))
    plan = admit(scheduler)
    assert len(plan.decode) == 1 and len(plan.prefill) == 1
