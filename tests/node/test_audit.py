"""The auditor's checks over real signed receipts and Merkle roots (no network)."""

from __future__ import annotations

import dataclasses
import os

from longtail.attribution.log import MerkleLog
from longtail.attribution.merkle import leaf_hash
from longtail.attribution.receipts import AttributionVector, Receipt, ReceiptDomain, ReceiptSigner
from longtail.node.audit import CheckpointView, audit_node

KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
DOMAIN = ReceiptDomain(chain_id=31337, verifying_contract="0x" + "12" * 20)
SIGNER = ReceiptSigner(KEY, DOMAIN)


def make_receipts(count: int):
    vector = AttributionVector()
    out = []
    for seq in range(count):
        receipt = Receipt(node=SIGNER.address, seq=seq, request_id="0x" + os.urandom(32).hex(),
                          client="0x" + "cc" * 20, channel_id="0x" + "01" * 32, base_model_id="0x" + "02" * 32,
                          adapter_id="0x" + "03" * 32, prompt_hash="0x" + "04" * 32, output_hash="0x" + "05" * 32,
                          prompt_tokens=10, output_tokens=seq + 1, price=100 + seq, attribution_hash=vector.hash,
                          timestamp=1_700_000_000 + seq)
        out.append(SIGNER.sign(receipt, vector))
    return out


def checkpoints_for(receipts, sizes):
    log = MerkleLog(leaf_hash(r.digest) for r in receipts)
    return [CheckpointView(size, log.root(size)) for size in sizes]


def test_an_honest_log_is_clean():
    receipts = make_receipts(12)
    report = audit_node(SIGNER.address, receipts, checkpoints_for(receipts, [5, 9, 12]), DOMAIN)
    assert report.clean, report.findings
    assert report.receipts_checked == 12 and report.checkpoints_checked == 3


def test_an_edited_receipt_is_flagged_with_its_seq():
    receipts = make_receipts(8)
    checkpoints = checkpoints_for(receipts, [8])
    edited = dataclasses.replace(receipts[3], receipt=dataclasses.replace(receipts[3].receipt, price=1))
    report = audit_node(SIGNER.address, [*receipts[:3], edited, *receipts[4:]], checkpoints, DOMAIN)
    kinds = {(f.kind, f.where) for f in report.findings}
    assert ("bad-receipt", "seq 3") in kinds
    assert ("root-mismatch", "checkpoint size 8") in kinds


def test_a_hidden_receipt_shows_as_a_gap():
    receipts = make_receipts(6)
    report = audit_node(SIGNER.address, receipts[:2] + receipts[3:], checkpoints_for(receipts, [6]), DOMAIN)
    assert [f.kind for f in report.findings] == ["gap"]


def test_a_rewritten_history_is_inconsistent():
    receipts = make_receipts(10)
    other = make_receipts(10)
    forged = [checkpoints_for(other, [4])[0], checkpoints_for(receipts, [10])[0]]
    report = audit_node(SIGNER.address, receipts, forged, DOMAIN)
    assert {"root-mismatch", "inconsistent"} <= {f.kind for f in report.findings}


def test_receipts_signed_by_another_node_are_flagged():
    receipts = make_receipts(3)
    report = audit_node("0x" + "99" * 20, receipts, [], DOMAIN)
    assert [f.kind for f in report.findings] == ["bad-receipt"] * 3


def test_totals_are_recomputed_per_epoch():
    receipts = make_receipts(6)
    views = checkpoints_for(receipts, [2, 6])
    def totals(epoch):
        return {"price": sum(r.receipt.price for r in epoch)}
    honest = [dataclasses.replace(views[0], totals={"price": 201}), dataclasses.replace(views[1], totals={"price": 414})]
    assert audit_node(SIGNER.address, receipts, honest, DOMAIN, totals).clean
    inflated = [honest[0], dataclasses.replace(views[1], totals={"price": 999})]
    report = audit_node(SIGNER.address, receipts, inflated, DOMAIN, totals)
    assert [f.kind for f in report.findings] == ["totals-mismatch"]
