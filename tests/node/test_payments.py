"""Payments intake policy: post-pay with bounded credit, per DESIGN.md (chain reads faked, logic real)."""

from __future__ import annotations

import asyncio

import pytest

from longtail.node.errors import ChainUnavailable, InvalidVoucherSignature, PaymentRequired
from longtail.node.payments import ChannelState, PaymentIntake, Voucher, price_for_tokens

NODE = "0x" + "aa" * 20
CLIENT = "0x" + "cc" * 20
CHANNEL = "0x" + "01" * 32


def make_intake(deposit=1000, signer=CLIENT, credit_cap=None, chain_up=True):
    saved: list[Voucher] = []
    state = {"deposit": deposit, "up": chain_up}

    async def read_channel(channel_id):
        if not state["up"]:
            raise ConnectionError("chain down")
        return ChannelState(channel_id, CLIENT, NODE, state["deposit"], 0, False)

    async def load_account(channel_id):
        return 0, None

    async def save_voucher(voucher, client):
        saved.append(voucher)

    intake = PaymentIntake(NODE, read_channel, lambda v: signer, load_account, save_voucher, credit_cap=credit_cap,
                           channel_cache_seconds=0.0)
    return intake, saved, state


def voucher(amount):
    return Voucher(CHANNEL, amount, "0x" + "00" * 65)


def run(coro):
    return asyncio.run(coro)


def test_price_rounds_up_and_scales_per_thousand_tokens():
    assert price_for_tokens(1000, 1) == 1
    assert price_for_tokens(10**16, 1500) == 15 * 10**15
    assert price_for_tokens(0, 100) == 0


def test_first_request_needs_no_voucher_then_the_next_must_cover_it():
    async def scenario():
        intake, saved, _ = make_intake()
        first = await intake.reserve(CHANNEL, None, max_price=100)
        assert await intake.settle(first, 40) == 40
        with pytest.raises(PaymentRequired) as short:
            await intake.reserve(CHANNEL, voucher(39), max_price=100)
        assert short.value.details["pay_cumulative"] == "40"
        # A short voucher is still money the node keeps (stored before the refusal); it just does not admit.
        assert [v.cumulative_amount for v in saved] == [39]
        second = await intake.reserve(CHANNEL, voucher(40), max_price=100)
        # An admitted request's voucher waits for the channel's next receipt, which stores it in its commit.
        assert intake.unstored_voucher(CHANNEL) == voucher(40) and len(saved) == 1
        intake.mark_stored(CHANNEL, voucher(40))
        assert intake.unstored_voucher(CHANNEL) is None
        await intake.settle(second, 60)
        await intake.reserve(CHANNEL, voucher(100), max_price=100)
        assert intake.unstored_voucher(CHANNEL) == voucher(100)
    run(scenario())


def test_deposit_bounds_the_credit_including_in_flight_requests():
    async def scenario():
        intake, _, state = make_intake(deposit=250)
        a = await intake.reserve(CHANNEL, None, max_price=100)
        b = await intake.reserve(CHANNEL, None, max_price=100)
        with pytest.raises(PaymentRequired) as error:
            await intake.reserve(CHANNEL, None, max_price=100)
        assert error.value.details["top_up"] == "50"
        await intake.release(b)
        await intake.settle(a, 30)
        c = await intake.reserve(CHANNEL, voucher(30), max_price=100)
        await intake.release(c)
        state["deposit"] = 1000  # a top-up on chain is seen on the refresh
        await intake.reserve(CHANNEL, voucher(30), max_price=900)
    run(scenario())


def test_a_voucher_signed_by_someone_else_is_rejected():
    async def scenario():
        intake, saved, _ = make_intake(signer="0x" + "dd" * 20)
        with pytest.raises(InvalidVoucherSignature):
            await intake.reserve(CHANNEL, voucher(10), max_price=1)
        assert saved == []
    run(scenario())


def test_a_replayed_or_lower_voucher_changes_nothing():
    async def scenario():
        intake, saved, _ = make_intake()
        await intake.accept_voucher(voucher(50))
        await intake.accept_voucher(voucher(50))
        await intake.accept_voucher(voucher(20))
        assert [v.cumulative_amount for v in saved] == [50]
    run(scenario())


def test_credit_cap_limits_a_rich_channel():
    async def scenario():
        intake, _, _ = make_intake(deposit=10**9, credit_cap=150)
        await intake.reserve(CHANNEL, None, max_price=100)
        with pytest.raises(PaymentRequired):
            await intake.reserve(CHANNEL, None, max_price=100)
    run(scenario())


def test_chain_down_without_a_cached_view_is_a_typed_error():
    async def scenario():
        intake, _, _ = make_intake(chain_up=False)
        with pytest.raises(ChainUnavailable):
            await intake.reserve(CHANNEL, None, max_price=1)
    run(scenario())


def test_missing_channel_says_what_to_send():
    async def scenario():
        intake, _, _ = make_intake()
        with pytest.raises(PaymentRequired, match="X-Longtail-Channel"):
            await intake.reserve(None, None, max_price=7)
    run(scenario())


def test_a_request_that_ends_without_a_receipt_stores_its_voucher_itself():
    async def scenario():
        intake, saved, _ = make_intake()
        first = await intake.reserve(CHANNEL, voucher(10), max_price=5)
        assert intake.unstored_voucher(CHANNEL) == voucher(10) and saved == []
        await intake.release(first)  # the engine failed: no receipt will carry the voucher
        assert [v.cumulative_amount for v in saved] == [10]
        replay = await intake.reserve(CHANNEL, voucher(10), max_price=5)
        assert intake.unstored_voucher(CHANNEL) is None, "a voucher that pays nothing more needs no write"
        await intake.release(replay)
        assert len(saved) == 1
    run(scenario())


def test_a_voucher_another_request_brought_goes_with_the_next_receipt_on_the_channel():
    async def scenario():
        intake, _, _ = make_intake()
        await intake.reserve(CHANNEL, voucher(10), max_price=5)  # still generating: its receipt is far off
        # A second request admitted meanwhile answers first: its receipt must carry the voucher held in memory.
        await intake.reserve(CHANNEL, None, max_price=5)
        assert intake.unstored_voucher(CHANNEL) == voucher(10)
    run(scenario())


def test_a_voucher_whose_write_failed_is_written_again_later():
    async def scenario():
        attempts: list[int] = []
        disk_full = True

        async def read_channel(channel_id):
            return ChannelState(channel_id, CLIENT, NODE, 1000, 0, False)

        async def load_account(channel_id):
            return 0, None

        async def flaky_save(voucher, client):
            attempts.append(voucher.cumulative_amount)
            if disk_full:
                raise OSError("disk full")

        intake = PaymentIntake(NODE, read_channel, lambda v: CLIENT, load_account, flaky_save)
        first = await intake.reserve(CHANNEL, voucher(10), max_price=5)
        await intake.release(first)  # the write fails and is logged; the voucher stays unstored
        assert intake.unstored_voucher(CHANNEL) == voucher(10)
        disk_full = False
        second = await intake.reserve(CHANNEL, voucher(10), max_price=5)  # the same voucher again
        await intake.release(second)
        assert attempts == [10, 10] and intake.unstored_voucher(CHANNEL) is None
    run(scenario())


def test_a_failed_voucher_write_on_a_failing_request_keeps_the_first_error():
    async def scenario():
        async def read_channel(channel_id):
            return ChannelState(channel_id, CLIENT, NODE, 50, 0, False)

        async def load_account(channel_id):
            return 0, None

        async def broken_save(voucher, client):
            raise OSError("disk full")

        intake = PaymentIntake(NODE, read_channel, lambda v: CLIENT, load_account, broken_save)
        with pytest.raises(PaymentRequired, match="deposit does not cover"):
            await intake.reserve(CHANNEL, voucher(10), max_price=100)
        with pytest.raises(OSError, match="disk full"):
            await intake.accept_voucher(voucher(20))  # a voucher sent alone reports its own write
    run(scenario())


def test_a_stale_channel_view_serves_while_it_is_refreshed():
    async def scenario():
        reads: list[float] = []
        chain_answers = asyncio.Event()
        chain_answers.set()

        async def read_channel(channel_id):
            reads.append(asyncio.get_running_loop().time())
            await chain_answers.wait()
            return ChannelState(channel_id, CLIENT, NODE, 1000, 0, False)

        async def load_account(channel_id):
            return 0, None

        async def save_voucher(voucher, client):
            pass

        intake = PaymentIntake(NODE, read_channel, lambda v: CLIENT, load_account, save_voucher,
                               channel_cache_seconds=0.0)
        await intake.reserve(CHANNEL, None, max_price=1)  # no view yet: read at once
        chain_answers.clear()  # the chain is now slow; a stale view must not make requests wait for it
        await asyncio.wait_for(intake.reserve(CHANNEL, None, max_price=1), timeout=1)
        assert len(reads) == 2, "the stale view started one background refresh"
        chain_answers.set()
        await asyncio.sleep(0.01)
        assert not intake._refreshing
    run(scenario())


def test_a_stream_closed_before_its_headers_releases_its_credit_and_keeps_its_voucher():
    from longtail.node.service import Node

    async def scenario():
        intake, saved, _ = make_intake()
        first = await intake.reserve(CHANNEL, None, max_price=100)
        await intake.settle(first, 40)
        node = Node.__new__(Node)  # only the stream's own bookkeeping runs: admission is the intake's
        node.payments, node._in_flight = intake, 0

        class Generation:  # the stream awaits the engine's first answer before its headers
            async def stream(self, request, entry, prompt_ids):
                from longtail.node.generation import GenerationResult

                yield GenerationResult([1], "a", "a")

        node.generation = Generation()

        async def admit(request, channel_id, paying_voucher, times, authorization=None):
            return None, [], await intake.reserve(channel_id, paying_voucher, 100)

        node._admit = admit
        events = node.stream(None, CHANNEL, voucher(40))
        assert "receipt_pending" in await anext(events)
        await events.aclose()  # the HTTP edge failed before the headers went out (client gone)
        assert intake._accounts[CHANNEL].reserved == 0 and node._in_flight == 0
        assert [v.cumulative_amount for v in saved] == [40]
    run(scenario())


def test_prices_are_exact_integers_at_any_magnitude():
    # A float product was off by tens of base units here (issue 20).
    assert price_for_tokens(10**18 + 7, 4_999) == -(-(10**18 + 7) * 4_999 // 1000) == 4_999_000_000_000_000_035
    assert price_for_tokens(2**200, 3) == -(-(2**200) * 3 // 1000)
    assert isinstance(price_for_tokens(10**16, 1), int)
