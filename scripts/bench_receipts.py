"""Receipt throughput: sign + append + commit per second on SQLite (WAL, synchronous=FULL) and PostgreSQL.

The baseline, measured in the same run, is eth-account's typed-data signing
(`encode_typed_data` + `Account.sign_message`) alone, without any storage.
Writes a table to docs/attribution.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from longtail.attribution.receipts import AttributionVector, ReceiptDomain, ReceiptDraft, typed_data  # noqa: E402
from longtail.attribution.store import ReceiptLog  # noqa: E402
from longtail.scripts.docs_section import write_section  # noqa: E402

KEY = "0x" + "4c" * 32
DOMAIN = ReceiptDomain(31337, "0x5fbdb2315678afecb367f032d93f642f64180aa3")
VECTOR = AttributionVector(("0x" + "0a" * 32, "0x" + "0b" * 32), (6000, 4000))
PG_URL = os.environ.get("LONGTAIL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def draft(i: int) -> ReceiptDraft:
    return ReceiptDraft(request_id=f"0x{i:064x}", client="0x" + "c1" * 20, channel_id="0x" + "ce" * 32,
                        base_model_id="0x" + "ba" * 32, adapter_id="0x" + "ad" * 32, prompt_hash="0x" + "01" * 32,
                        output_hash=f"0x{i + 1:064x}", prompt_tokens=40, output_tokens=200, price=123_000,
                        timestamp=1_764_000_000 + i, attribution=VECTOR)


def measure(log: ReceiptLog, count: int, batch: int) -> float:
    drafts = [draft(i) for i in range(count)]
    started = time.perf_counter()
    for i in range(0, count, batch):
        log.append_many(drafts[i:i + batch])
    return count / (time.perf_counter() - started)


def baseline(count: int) -> float:
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    receipts = [draft(i).to_receipt(Account.from_key(KEY).address, i) for i in range(count)]
    started = time.perf_counter()
    for receipt in receipts:
        Account.sign_message(encode_typed_data(full_message=typed_data(receipt, DOMAIN)), KEY)
    return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    base = baseline(500)
    print(f"baseline eth-account sign_message only: {base:,.0f}/s")
    rows = ["| store | batch (receipts per commit) | sign + append + commit per second | vs eth-account signing alone |",
            "| --- | --- | --- | --- |", f"| none (baseline) | – | {base:,.0f} (eth-account sign only) | 1.0x |"]
    targets: list[tuple[str, str, str | None]] = []
    folder = tempfile.mkdtemp(prefix="bench-receipts-")
    targets.append(("SQLite (WAL, synchronous=FULL)", f"sqlite:///{folder}/log.db", None))
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(PG_URL, connect_args={"connect_timeout": 2})
        schema = f"lt_bench_{uuid.uuid4().hex[:10]}"
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        targets.append(("PostgreSQL 15", PG_URL, schema))
    except Exception as error:  # a missing PostgreSQL only drops its rows
        print(f"PostgreSQL skipped: {error}")
        engine, schema = None, None
    try:
        for label, url, target_schema in targets:
            for batch in (1, 32, 256):
                log = ReceiptLog.open(url, KEY, DOMAIN, schema=target_schema)
                count = min(args.count, 600) if batch == 1 else args.count
                rate = measure(log, count, batch)
                log.close()
                print(f"{label:32s} batch {batch:4d}: {rate:,.0f}/s ({rate / base:.1f}x)")
                rows.append(f"| {label} | {batch} | {rate:,.0f} | {rate / base:.1f}x |")
                # Fresh log per configuration so every run starts from seq 0 at the same size.
                if url.startswith("sqlite"):
                    Path(url[len("sqlite:///"):]).unlink()
                else:
                    with engine.begin() as connection:
                        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    finally:
        if engine is not None:
            with engine.begin() as connection:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    if not args.no_docs:
        write_section(REPO / "docs" / "attribution.md", "bench_receipts", "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
