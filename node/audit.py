"""The auditor's checks, as pure functions over what a node serves and what the chain holds.

Given a node's receipts (bodies with signatures) and its checkpoints on chain,
an auditor verifies every signature and domain, that `seq` runs 0..n-1 without
gaps or duplicates, that each checkpoint's root is the root of the receipts'
leaf hashes at that size, that consecutive checkpoints are consistent, and that
each checkpoint's payout totals equal the totals recomputed from the receipts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from longtail.attribution.log import MerkleLog
from longtail.attribution.merkle import leaf_hash, verify_consistency
from longtail.attribution.receipts import ReceiptDomain, ReceiptError, SignedReceipt, verify_receipt


@dataclasses.dataclass(frozen=True)
class CheckpointView:
    """A checkpoint as read from the chain (or served by the node)."""

    tree_size: int
    root_hash: bytes
    totals: dict | None = None


@dataclasses.dataclass(frozen=True)
class Finding:
    """One discrepancy: what, where, and why it matters."""

    kind: str
    where: str
    detail: str


@dataclasses.dataclass(frozen=True)
class AuditReport:
    node: str
    receipts_checked: int
    checkpoints_checked: int
    findings: tuple[Finding, ...]

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_json(self) -> dict:
        return {"node": self.node, "receipts_checked": self.receipts_checked,
                "checkpoints_checked": self.checkpoints_checked, "clean": self.clean,
                "findings": [dataclasses.asdict(f) for f in self.findings]}


TotalsFunction = Callable[[Sequence[SignedReceipt]], dict]


def audit_node(node: str, receipts: Sequence[SignedReceipt], checkpoints: Sequence[CheckpointView],
               domain: ReceiptDomain, totals_of: TotalsFunction | None = None) -> AuditReport:
    """Run every check; never stops at the first finding so the report names them all."""
    findings: list[Finding] = []
    by_seq: dict[int, SignedReceipt] = {}
    for signed in receipts:
        seq = signed.receipt.seq
        try:
            verify_receipt(signed, domain, expected_signer=node)
        except ReceiptError as error:
            findings.append(Finding("bad-receipt", f"seq {seq}", f"{type(error).__name__}: {error}"))
        if seq in by_seq:
            findings.append(Finding("duplicate-seq", f"seq {seq}", "two receipts claim the same position"))
        by_seq[seq] = signed
    size = max(by_seq, default=-1) + 1
    missing = [s for s in range(size) if s not in by_seq]
    if missing:
        findings.append(Finding("gap", f"seq {missing[0]}", f"{len(missing)} receipts missing below {size}"))
    log = MerkleLog(leaf_hash(by_seq[s].digest) for s in range(size) if s in by_seq) if not missing else None
    previous: CheckpointView | None = None
    for checkpoint in sorted(checkpoints, key=lambda c: c.tree_size):
        where = f"checkpoint size {checkpoint.tree_size}"
        if log is not None:
            if checkpoint.tree_size > log.size:
                findings.append(Finding("unserved-receipts", where,
                                        f"the chain commits to {checkpoint.tree_size} receipts, the node served {log.size}"))
            elif log.root(checkpoint.tree_size) != checkpoint.root_hash:
                findings.append(Finding("root-mismatch", where,
                                        f"chain root 0x{checkpoint.root_hash.hex()} != recomputed "
                                        f"0x{log.root(checkpoint.tree_size).hex()}"))
            elif totals_of is not None and checkpoint.totals is not None:
                start = previous.tree_size if previous is not None else 0
                epoch = [by_seq[s] for s in range(start, checkpoint.tree_size)]
                expected = totals_of(epoch)
                if expected != checkpoint.totals:
                    findings.append(Finding("totals-mismatch", where, f"chain {checkpoint.totals} != receipts {expected}"))
        # RFC 9162 defines no consistency proof from the empty tree; the first checkpoint has none.
        if previous is not None and previous.tree_size > 0 and log is not None and checkpoint.tree_size <= log.size:
            try:
                proof = log.consistency_proof(previous.tree_size, checkpoint.tree_size)
                verify_consistency(previous.tree_size, checkpoint.tree_size, previous.root_hash,
                                   checkpoint.root_hash, proof)
            except Exception as error:  # the verifier raises its own error class with the reason
                findings.append(Finding("inconsistent", where,
                                        f"not an extension of size {previous.tree_size}: {error}"))
        previous = checkpoint
    return AuditReport(node=node, receipts_checked=len(receipts), checkpoints_checked=len(checkpoints),
                       findings=tuple(findings))
