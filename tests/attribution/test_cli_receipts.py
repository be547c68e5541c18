"""`receipt verify` and `log root|proof|consistency` through the CLI, against a real SQLite log."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from longtail.attribution.merkle import verify_consistency, verify_inclusion
from longtail.attribution.receipts import AttributionVector, ReceiptDomain, ReceiptDraft
from longtail.attribution.store import ReceiptLog
from longtail.node.commands.receipts import app

KEY = "0x" + "4c" * 32
DOMAIN = ReceiptDomain(31337, "0x5fbdb2315678afecb367f032d93f642f64180aa3")
runner = CliRunner()


def make_log(tmp_path, count=12):
    url = f"sqlite:///{tmp_path / 'node.sqlite'}"
    log = ReceiptLog.open(url, KEY, DOMAIN)
    vector = AttributionVector(("0x" + "0a" * 32,), (10000,))
    log.append_many([ReceiptDraft(f"0x{i:064x}", "0x" + "c1" * 20, "0x" + "ce" * 32, "0x" + "ba" * 32,
                                  "0x" + "ad" * 32, "0x" + "01" * 32, "0x" + "02" * 32, 3, 4, 5, 1_764_000_000,
                                  vector) for i in range(count)])
    return url, log


def test_receipt_verify_accepts_good_and_names_the_fault_in_bad(tmp_path):
    _, log = make_log(tmp_path)
    good = tmp_path / "good.json"
    good.write_bytes(log.get(3).to_canonical_json())
    result = runner.invoke(app, ["receipt", "verify", str(good), "--json", "--node", log.node])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["valid"] is True

    body = json.loads(good.read_text())
    body["receipt"]["price"] = "6"
    del body["digest"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "\n" + json.dumps(body) + "\n")
    result = runner.invoke(app, ["receipt", "verify", str(bad), "--json"])
    assert result.exit_code == 1
    verdicts = json.loads(result.output)
    assert [v["valid"] for v in verdicts] == [True, False] and "InvalidSignature" in verdicts[1]["error"]
    result = runner.invoke(app, ["receipt", "verify", str(good), "--json", "--chain-id", "1"])
    assert result.exit_code == 1 and "WrongDomain" in json.loads(result.output)[0]["error"]


def test_log_commands_print_proofs_that_verify(tmp_path):
    url, log = make_log(tmp_path)
    root = json.loads(runner.invoke(app, ["log", "root", "--db", url, "--json"]).output)
    assert root == {"node": log.node, "size": 12, "root": "0x" + log.root().hex()}
    proof = json.loads(runner.invoke(app, ["log", "proof", "5", "--size", "9", "--db", url, "--json"]).output)
    verify_inclusion(5, 9, bytes.fromhex(proof["leafHash"][2:]), [bytes.fromhex(p[2:]) for p in proof["proof"]],
                     log.root(9))
    consistency = json.loads(runner.invoke(app, ["log", "consistency", "7", "--db", url, "--json"]).output)
    verify_consistency(7, 12, log.root(7), log.root(12), [bytes.fromhex(p[2:]) for p in consistency["proof"]])
    result = runner.invoke(app, ["log", "proof", "12", "--db", url, "--json"])
    assert result.exit_code == 1 and "outside" in result.output
