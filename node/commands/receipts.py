"""`longtail receipt verify` and `longtail log root|proof|consistency`: audit receipts and a node's log."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from longtail.attribution.merkle import InvalidProof, verify_consistency, verify_inclusion
from longtail.attribution.receipts import ReceiptDomain, ReceiptError, SignedReceipt, verify_receipt
from longtail.attribution.store import ReceiptStore, StoreError
from longtail.node.output import fail, print_json, print_table

receipt_app = typer.Typer(help="Verify signed receipts.", no_args_is_help=True)
log_app = typer.Typer(help="Roots and proofs of a node's receipt log.", no_args_is_help=True)
app = typer.Typer(help="Receipts and the receipt log.", no_args_is_help=True)
app.add_typer(receipt_app, name="receipt")
app.add_typer(log_app, name="log")

JSON_OPTION = typer.Option(False, "--json", help="print JSON for scripts")


def _bodies(path: Path) -> list[dict]:
    """A file holds one receipt body, a JSON list of them, or one per line."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return data if isinstance(data, list) else [data]


@receipt_app.command("verify")
def verify_command(files: list[Path] = typer.Argument(..., help="receipt body files (JSON, JSON list or JSONL)"),
                   chain_id: int | None = typer.Option(None, help="expected chain id (default: the body's own)"),
                   ledger: str | None = typer.Option(None, help="expected AttributionLedger address"),
                   node: str | None = typer.Option(None, help="expected signing node address"),
                   as_json: bool = JSON_OPTION) -> None:
    """Check each receipt's domain, attribution vector and signature; exit 1 if any fails."""
    results = []
    for path in files:
        try:
            bodies = _bodies(path)
        except (OSError, json.JSONDecodeError) as error:
            results.append({"file": str(path), "seq": None, "valid": False, "error": f"cannot read: {error}"})
            continue
        for body in bodies:
            seq = (body.get("receipt") or {}).get("seq") if isinstance(body, dict) else None
            try:
                signed = SignedReceipt.from_json(body)
                domain = ReceiptDomain(chain_id if chain_id is not None else signed.domain.chain_id,
                                       ledger or signed.domain.verifying_contract)
                signer = verify_receipt(signed, domain, expected_signer=node)
                results.append({"file": str(path), "seq": signed.receipt.seq, "valid": True, "signer": signer,
                                "digest": "0x" + signed.digest.hex()})
            except (ReceiptError, ValueError, TypeError, AttributeError) as error:
                results.append({"file": str(path), "seq": seq, "valid": False,
                                "error": f"{type(error).__name__}: {error}"})
    if as_json:
        print_json(results)
    else:
        print_table("receipts", ["file", "seq", "valid", "detail"],
                    [(r["file"], r["seq"], "yes" if r["valid"] else "NO", r.get("signer") or r.get("error"))
                     for r in results])
    if not all(r["valid"] for r in results):
        raise typer.Exit(1)


def _default_db() -> str:
    from longtail.node.config import load_config

    return load_config().resolved_database_url


def _open_tree(db: str | None, node: str | None):
    try:
        store = ReceiptStore.open(db or _default_db())
        nodes = store.nodes()
        if node is None:
            if len(nodes) != 1:
                fail(f"the store holds {len(nodes)} node logs {nodes}; choose one with --node")
            node = nodes[0]
        return node, store.load_tree(node)
    except StoreError as error:
        fail(str(error))


DB_OPTION = typer.Option(None, "--db", help="database URL (default: the node's configured store)")
NODE_OPTION = typer.Option(None, "--node", help="node address (default: the only node in the store)")


@log_app.command("root")
def root_command(size: int | None = typer.Option(None, help="tree size (default: current)"),
                 db: str | None = DB_OPTION, node: str | None = NODE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """The log's size and RFC 9162 root hash."""
    node, tree = _open_tree(db, node)
    size = tree.size if size is None else size
    if not 0 <= size <= tree.size:
        fail(f"size {size} is beyond the log's size {tree.size}")
    _show({"node": node, "size": size, "root": "0x" + tree.root(size).hex()}, as_json)


@log_app.command("proof")
def proof_command(seq: int = typer.Argument(..., help="the receipt's seq (leaf index)"),
                  size: int | None = typer.Option(None, help="tree size (default: current)"),
                  db: str | None = DB_OPTION, node: str | None = NODE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Inclusion proof of receipt `seq` in the tree of `size` leaves (checked before printing)."""
    node, tree = _open_tree(db, node)
    size = tree.size if size is None else size
    try:
        proof = tree.inclusion_proof(seq, size)
        verify_inclusion(seq, size, tree.leaf(seq), proof, tree.root(size))
    except (IndexError, InvalidProof) as error:
        fail(str(error))
    _show({"node": node, "seq": seq, "size": size, "leafHash": "0x" + tree.leaf(seq).hex(),
           "root": "0x" + tree.root(size).hex(), "proof": ["0x" + p.hex() for p in proof]}, as_json)


@log_app.command("consistency")
def consistency_command(old_size: int = typer.Argument(..., help="the earlier tree size"),
                        new_size: int | None = typer.Argument(None, help="the later tree size (default: current)"),
                        db: str | None = DB_OPTION, node: str | None = NODE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Consistency proof that the tree of `new_size` extends the tree of `old_size`."""
    node, tree = _open_tree(db, node)
    new_size = tree.size if new_size is None else new_size
    try:
        proof = tree.consistency_proof(old_size, new_size)
        verify_consistency(old_size, new_size, tree.root(old_size), tree.root(new_size), proof)
    except (IndexError, ValueError) as error:
        fail(str(error))
    _show({"node": node, "oldSize": old_size, "newSize": new_size, "oldRoot": "0x" + tree.root(old_size).hex(),
           "newRoot": "0x" + tree.root(new_size).hex(), "proof": ["0x" + p.hex() for p in proof]}, as_json)


def _show(data: dict, as_json: bool) -> None:
    if as_json:
        print_json(data)
    else:
        print_table("log", ["field", "value"],
                    [(k, "\n".join(v) if isinstance(v, list) else v) for k, v in data.items()])
