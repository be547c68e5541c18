"""The node's small web page (`GET /`): adapters, recent receipts with attribution, earnings, checkpoints.

Server-rendered HTML with no script, so it works in any browser and in tests
that read the DOM; values are escaped because adapter names come from users.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1d2430;background:#fafbfc}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;font-size:.9rem}td,th{padding:.3rem .6rem;border-bottom:1px solid #e5e9ef;text-align:left}
code{font-size:.8rem;color:#57606a}.muted{color:#57606a}
"""


def _cell(value: object) -> str:
    return f"<td>{html.escape(str(value))}</td>"


def _table(table_id: str, columns: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> str:
    if not rows:
        return f'<p id="{table_id}" class="muted">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def short(value: str | None, keep: int = 10) -> str:
    if not value:
        return "-"
    return value if len(value) <= keep + 4 else f"{value[:keep]}…"


def render_dashboard(node: dict, adapters: Sequence[dict], receipts: Sequence[dict], earnings: dict,
                     checkpoints: Sequence[dict]) -> str:
    """The page, from plain JSON-like data the node already serves on its API."""
    adapter_rows = [(a["id"], short(a.get("adapter_id")), a.get("price_per_1k_tokens", ""),
                     ", ".join(f'{d.get("name") or short(d["datanet_id"])} {d["share_bps"] / 100:.0f}%'
                               for d in a.get("datanets", [])) or "-") for a in adapters]
    receipt_rows = [(r["receipt"]["seq"], r.get("model", ""), short(r["receipt"]["requestId"]),
                     r["receipt"]["promptTokens"], r["receipt"]["outputTokens"], r["receipt"]["price"],
                     r.get("top_datanet") or "-", short(r.get("signature"), 14)) for r in receipts]
    earning_rows = [(k, v) for k, v in earnings.items()]
    checkpoint_rows = [(c.get("tree_size"), short(c.get("root_hash"), 18), c.get("epoch") or "-",
                        c.get("posted_at", "")) for c in checkpoints]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Longtail node {html.escape(node.get('name', ''))}</title>
<style>{STYLE}</style></head><body>
<h1>Longtail node <span id="node-name">{html.escape(node.get('name', ''))}</span></h1>
<p class="muted">operator <code id="node-address">{html.escape(node.get('address', ''))}</code>
 · peer <code>{html.escape(short(node.get('peer_id'), 16))}</code> · log size <b id="log-size">{node.get('log_size', 0)}</b></p>
<h2>Adapters</h2>{_table('adapters', ['name', 'adapterId', 'price / 1k tokens', 'Datanets'], adapter_rows, 'no adapters')}
<h2>Recent requests</h2>{_table('receipts', ['seq', 'model', 'requestId', 'prompt tok', 'output tok', 'price', 'top Datanet', 'signature'], receipt_rows, 'no requests yet')}
<h2>Earnings</h2>{_table('earnings', ['item', 'OPEN base units'], earning_rows, 'nothing earned yet')}
<h2>Log checkpoints</h2>{_table('checkpoints', ['tree size', 'root', 'epoch on chain', 'recorded'], checkpoint_rows, 'no checkpoint posted yet')}
</body></html>
"""
