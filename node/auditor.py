"""The auditor's I/O: pull a node's receipts over HTTP and its checkpoints from the chain, then check them."""

from __future__ import annotations

import aiohttp
from web3 import Web3

from longtail.attribution.receipts import DigestMismatch, ReceiptDomain, ReceiptError, SignedReceipt
from longtail.contracts.client import LongtailContracts
from longtail.contracts.deployment import Deployment
from longtail.contracts.payouts import CheckpointPayouts
from longtail.node.audit import AuditReport, CheckpointView, Finding, audit_node
from longtail.node.checkpoints import epoch_payouts

PAGE = 500


def payout_totals(revenue: int, adapters, datanets) -> dict:
    """The comparable shape of a checkpoint's payouts: revenue, and non-zero lines per adapter and Datanet.

    Base-model revenue (adapter id 0) is the node's alone and has no adapter line on chain, so it
    counts only in the revenue total.
    """
    return {"revenue": revenue,
            "adapters": {a.id.lower(): a.amount for a in adapters if a.amount and int(a.id, 16) != 0},
            "datanets": {d.id.lower(): d.amount for d in datanets if d.amount}}


def parse_body(body: dict, findings: list[Finding]) -> SignedReceipt | None:
    """A served body as a receipt; a body whose stated digest disagrees is still checked, and flagged."""
    where = f"seq {body.get('receipt', {}).get('seq', '?')}"
    try:
        return SignedReceipt.from_json(body)
    except DigestMismatch as error:
        findings.append(Finding("digest-mismatch", where, str(error)))
        try:
            return SignedReceipt.from_json({k: v for k, v in body.items() if k != "digest"})
        except ReceiptError as inner:
            findings.append(Finding("malformed-receipt", where, str(inner)))
    except ReceiptError as error:
        findings.append(Finding("malformed-receipt", where, str(error)))
    return None


async def fetch_receipts(session: aiohttp.ClientSession, url: str,
                         findings: list[Finding]) -> list[SignedReceipt]:
    receipts: list[SignedReceipt] = []
    fetched = 0
    while True:
        params = {"from_seq": fetched, "to_seq": fetched + PAGE}
        async with session.get(f"{url}/v1/receipts", params=params) as response:
            response.raise_for_status()
            page = (await response.json())["receipts"]
        fetched += len(page)
        receipts.extend(r for r in (parse_body(body, findings) for body in page) if r is not None)
        if len(page) < PAGE:
            return receipts


async def audit(url: str, rpc_url: str, deployment: Deployment, node: str | None = None) -> AuditReport:
    contracts = LongtailContracts.connect(Web3(Web3.HTTPProvider(rpc_url)), deployment)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(f"{url}/healthz") as response:
            served_by = (await response.json())["node"]
        node = node or served_by
        findings: list[Finding] = []
        try:
            receipts = await fetch_receipts(session, url, findings)
        except aiohttp.ClientError as error:
            return AuditReport(node, 0, 0, (Finding("unreachable", url, str(error)),))
    if served_by.lower() != node.lower():
        findings.append(Finding("wrong-node", url, f"{url} is node {served_by}, not {node}"))
    records = contracts.ledger.checkpoints(node)
    split = contracts.ledger.split()
    adapters_with_datanets = {a.adapter_id for a in contracts.registry.registered_adapters() if a.datanet_shares}

    def totals_of(epoch: list[SignedReceipt]) -> dict:
        planned: CheckpointPayouts = epoch_payouts(epoch, split, adapters_with_datanets)
        return payout_totals(planned.revenue, planned.adapters, planned.datanets)

    views = [CheckpointView(r.tree_size, bytes.fromhex(r.root_hash[2:]), payout_totals(r.revenue, r.adapters, r.datanets))
             for r in records]
    domain = ReceiptDomain(chain_id=deployment.chain_id, verifying_contract=deployment.ledger)
    report = audit_node(node, receipts, views, domain, totals_of)
    return AuditReport(report.node, report.receipts_checked, report.checkpoints_checked,
                       tuple(findings) + report.findings)
