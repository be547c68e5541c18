"""The receipt log's store on SQLite and PostgreSQL: round trips, proofs after reopen, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from longtail.attribution.merkle import leaf_hash, verify_consistency, verify_inclusion
from longtail.attribution.receipts import (
    AttributionVector,
    ReceiptDomain,
    ReceiptDraft,
    SignedReceipt,
    verify_receipt,
)
from longtail.attribution.store import (
    ChannelVoucher,
    Checkpoint,
    LogConflict,
    ReceiptLog,
    ReceiptStore,
    StoreError,
)

REPO = Path(__file__).resolve().parents[2]
NODE_KEY = "0x" + "4c" * 32
DOMAIN = ReceiptDomain(chain_id=31337, verifying_contract="0x5fbdb2315678afecb367f032d93f642f64180aa3")
VECTOR = AttributionVector(("0x" + "0a" * 32,), (10000,))


def draft(i: int, channel: str = "0x" + "ce" * 32, price: int = 1000) -> ReceiptDraft:
    return ReceiptDraft(request_id=f"0x{i:064x}", client="0x" + "c1" * 20, channel_id=channel,
                        base_model_id="0x" + "ba" * 32, adapter_id="0x" + "ad" * 32, prompt_hash="0x" + "01" * 32,
                        output_hash=f"0x{i + 1:064x}", prompt_tokens=5, output_tokens=i % 50 + 1, price=price,
                        timestamp=1_764_000_000 + i, attribution=VECTOR)


def test_appends_round_trip_and_prove_after_reopen(database):
    url, schema = database
    log = ReceiptLog.open(url, NODE_KEY, DOMAIN, schema=schema)
    first = log.append(draft(0))
    assert first.receipt.seq == 0
    batch = log.append_many([draft(i) for i in range(1, 40)])
    assert [s.receipt.seq for s in batch] == list(range(1, 40))
    checkpoint_20 = log.root(20)
    log.checkpoint(epoch=1)
    log.close()

    again = ReceiptLog.open(url, NODE_KEY, DOMAIN, schema=schema)
    assert again.size == 40 and again.root(20) == checkpoint_20
    assert again.verify() == 40
    stored = again.get(17)
    assert stored == batch[16] and stored.to_canonical_json() == batch[16].to_canonical_json()
    verify_receipt(stored, DOMAIN, expected_signer=again.node)
    verify_inclusion(17, 40, leaf_hash(stored.digest), again.inclusion_proof(17), again.root())
    more = again.append_many([draft(i) for i in range(40, 45)])
    assert more[0].receipt.seq == 40
    verify_consistency(40, 45, again.root(40), again.root(), again.consistency_proof(40))
    [checkpoint] = again.store.checkpoints(again.node)
    assert checkpoint == Checkpoint(again.node, 40, "0x" + again.root(40).hex(), checkpoint.created_at, 1)
    assert [SignedReceipt.from_json(b).receipt.seq for b in again.store.bodies_for_request(f"0x{17:064x}")] == [17]
    assert again.store.channel_total(again.node, "0x" + "ce" * 32) == 45 * 1000
    with pytest.raises(KeyError, match="seq 99"):
        again.get(99)
    again.close()


def test_a_second_writer_cannot_fork_the_log(database):
    url, schema = database
    writer = ReceiptLog.open(url, NODE_KEY, DOMAIN, schema=schema)
    rival = ReceiptLog.open(url, NODE_KEY, DOMAIN, schema=schema)
    writer.append_many([draft(i) for i in range(3)])
    with pytest.raises(LogConflict, match="seq 0..0"):
        rival.append(draft(100))
    assert rival.size == 0  # the failed batch left no trace in memory
    writer.close()
    rival.close()


def test_channel_state_keeps_the_highest_voucher(database):
    url, schema = database
    store = ReceiptStore.open(url, schema)
    channel, client = "0x" + "ce" * 32, "0x" + "c1" * 20
    assert store.channel(channel) is None
    store.record_deposit(channel, client, 10**24)
    assert store.record_voucher(channel, client, 500, "0x" + "aa" * 65)
    assert not store.record_voucher(channel, client, 400, "0x" + "bb" * 65)
    assert store.record_voucher(channel, client, 2**255, "0x" + "cc" * 65)
    store.record_redeemed(channel, client, 500)
    state = store.channel(channel)
    assert (state.deposit_seen, state.voucher_amount, state.voucher_signature, state.redeemed) == (
        10**24, 2**255, "0x" + "cc" * 65, 500)
    store.close()


@pytest.mark.parametrize("first, second, kept", [
    (999, 1000, True),      # more digits: larger, though "1000" < "999" as text
    (1000, 999, False),     # fewer digits: smaller, though "999" > "1000" as text
    (1234, 1235, True),
    (1235, 1234, False),
    (1234, 1234, False),    # the same amount again changes nothing
    (2**200, 2**255, True),
])
def test_a_voucher_is_kept_only_when_it_pays_more(database, first, second, kept):
    url, schema = database
    store = ReceiptStore.open(url, schema)
    channel, client = "0x" + "ce" * 32, "0x" + "c1" * 20
    assert store.record_voucher(channel, client, first, "0x" + "aa" * 65)  # a new channel row
    assert store.record_voucher(channel, client, second, "0x" + "bb" * 65) is kept
    state = store.channel(channel)
    assert (state.voucher_amount, state.voucher_signature) == (
        (second, "0x" + "bb" * 65) if kept else (first, "0x" + "aa" * 65))
    store.close()


def test_a_voucher_rides_in_a_receipts_commit_and_falls_with_it(database):
    url, schema = database
    log = ReceiptLog.open(url, NODE_KEY, DOMAIN, schema=schema)
    rival = ReceiptLog.open(url, NODE_KEY, DOMAIN, schema=schema)
    channel, client = "0x" + "ce" * 32, "0x" + "c1" * 20
    log.append(draft(0), [ChannelVoucher(channel, client, 700, "0x" + "aa" * 65)])  # a new channel row
    log.append(draft(1), [ChannelVoucher(channel, client, 600, "0x" + "bb" * 65)])  # lower voucher: the receipt only
    assert log.size == 2
    state = log.store.channel(channel)
    assert (state.voucher_amount, state.voucher_signature) == (700, "0x" + "aa" * 65)
    with pytest.raises(LogConflict):  # seq 0 is taken: the receipt and its voucher are refused together
        rival.append(draft(9), [ChannelVoucher(channel, client, 900, "0x" + "cc" * 65)])
    assert log.store.channel(channel).voucher_amount == 700
    log.close()
    rival.close()


def test_a_failed_commit_leaves_nothing_for_the_next_write(tmp_path):
    """SQLite's write path: a commit that fails (a full disk, a lock) is rolled back, so the next transaction
    does not carry its rows, and the log appends the same seq again without a conflict."""
    import sqlite3

    log = ReceiptLog.open(f"sqlite:///{tmp_path / 'log.sqlite'}", NODE_KEY, DOMAIN)
    real = log.store._driver._connection

    class CommitFailsOnce:
        failed = False

        def __getattr__(self, name):
            return getattr(real, name)

        def commit(self):
            if not CommitFailsOnce.failed:
                CommitFailsOnce.failed = True
                raise sqlite3.OperationalError("disk I/O error")
            real.commit()

    log.store._driver._connection = CommitFailsOnce()
    channel, client = "0x" + "ce" * 32, "0x" + "c1" * 20
    with pytest.raises(sqlite3.OperationalError):
        log.append(draft(0), [ChannelVoucher(channel, client, 700, "0x" + "aa" * 65)])
    assert log.size == 0 and not real.in_transaction
    log.store.record_deposit("0x" + "dd" * 32, client, 5)  # an unrelated write commits only its own row
    assert log.store.channel(channel) is None
    assert log.append(draft(1)).receipt.seq == 0
    log.close()
    assert ReceiptLog.open(f"sqlite:///{tmp_path / 'log.sqlite'}", NODE_KEY, DOMAIN).verify() == 1


WRITER = textwrap.dedent("""
    import sys
    from longtail.attribution.receipts import AttributionVector, ReceiptDomain, ReceiptDraft
    from longtail.attribution.store import ReceiptLog
    url, schema = sys.argv[1], (sys.argv[2] or None)
    domain = ReceiptDomain(31337, "0x5fbdb2315678afecb367f032d93f642f64180aa3")
    vector = AttributionVector(("0x" + "0a" * 32,), (10000,))
    log = ReceiptLog.open(url, "0x" + "4c" * 32, domain, schema=schema)
    i = log.size
    while True:
        batch = [ReceiptDraft(request_id=f"0x{i + j:064x}", client="0x" + "c1" * 20, channel_id="0x" + "ce" * 32,
                              base_model_id="0x" + "ba" * 32, adapter_id="0x" + "ad" * 32, prompt_hash="0x" + "01" * 32,
                              output_hash="0x" + "02" * 32, prompt_tokens=1, output_tokens=1, price=1,
                              timestamp=1764000000, attribution=vector) for j in range(1 + i % 7)]
        signed = log.append_many(batch)
        i += len(batch)
        print(signed[-1].receipt.seq, flush=True)
""")


@pytest.mark.slow
def test_sigkill_mid_append_leaves_no_gap_and_a_verifying_log(database):
    url, schema = database
    durable = -1
    for _round in range(2):
        process = subprocess.Popen([sys.executable, "-c", WRITER, url, schema or ""], cwd=REPO,
                                   stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 60
        lines = 0
        while lines < 150 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            durable = max(durable, int(line))
            lines += 1
        # Killed between (or inside) commits: whatever it reported as committed must survive.
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert lines == 150, "the writer did not get going"
        log = ReceiptLog.open(url, NODE_KEY, DOMAIN, schema=schema)
        assert log.size >= durable + 1
        assert [seq for seq, _ in log.store.leaf_hashes(log.node)] == list(range(log.size))
        assert log.verify() == log.size
        if durable + 1 < log.size:  # a batch committed after its last report is kept, and consistent
            verify_consistency(durable + 1, log.size, log.root(durable + 1), log.root(),
                               log.consistency_proof(durable + 1))
        log.close()


def test_a_gap_in_storage_is_refused_on_open(tmp_path):
    url = f"sqlite:///{tmp_path / 'gap.db'}"
    log = ReceiptLog.open(url, NODE_KEY, DOMAIN)
    log.append_many([draft(i) for i in range(5)])
    with log.store.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM receipts WHERE seq = 2")
    log.close()
    with pytest.raises(StoreError, match="gap: seq 3 follows 1"):
        ReceiptLog.open(url, NODE_KEY, DOMAIN)
