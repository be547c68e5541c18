"""The receipt log's SQL store and the `ReceiptLog` that signs, persists and proves receipts.

Tables: `receipts` (one row per signed receipt, unique `(node, seq)`),
`adapter_credits` (evidence computed after a receipt was served, an annex
keyed like it), `checkpoints` (tree sizes and roots the node committed to) and
`channels` (payment channel state the node has seen). SQLite in WAL mode with
`synchronous=FULL` by default, PostgreSQL by URL, through the same models.

The Merkle tree is not stored node by node: each receipt row carries its leaf
hash, and opening a log reads that one column and rebuilds the tree in memory
(about a second per million receipts), then checks it has no gap. A tree
persisted node by node would cost a second write per receipt on the hot path
to save that second at start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    LargeBinary,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from attribution.log import MerkleLog
from attribution.merkle import leaf_hash
from attribution.receipts import AdapterCredit, ReceiptDomain, ReceiptDraft, ReceiptSigner, SignedReceipt


class StoreError(RuntimeError):
    """The store's contents break an invariant of the log (gap, duplicate, bad leaf)."""


class LogConflict(StoreError):
    """Another writer appended to this node's log: `seq` values collided."""


class Base(DeclarativeBase):
    pass


class ReceiptRow(Base):
    __tablename__ = "receipts"

    node: Mapped[str] = mapped_column(String(42), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(66), index=True)
    channel_id: Mapped[str] = mapped_column(String(66), index=True)
    # uint256 as decimal text: SQLite would turn a large NUMERIC into a lossy float.
    price: Mapped[str] = mapped_column(String(78))
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    body: Mapped[str] = mapped_column(Text)


class AdapterCreditRow(Base):
    """A receipt's adapter credit, computed after the answer left. It is not signed (not in the digest), so it
    lives beside the append-only receipt row instead of rewriting it."""

    __tablename__ = "adapter_credits"

    node: Mapped[str] = mapped_column(String(42), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(66), index=True)
    credit: Mapped[str] = mapped_column(Text)  # AdapterCredit.to_json(), compact


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    node: Mapped[str] = mapped_column(String(42), primary_key=True)
    tree_size: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    root: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tx_hash: Mapped[str | None] = mapped_column(String(66), nullable=True)


class ChannelRow(Base):
    __tablename__ = "channels"

    channel_id: Mapped[str] = mapped_column(String(66), primary_key=True)
    client: Mapped[str] = mapped_column(String(42))
    deposit_seen: Mapped[str] = mapped_column(String(78), default="0")
    voucher_amount: Mapped[str] = mapped_column(String(78), default="0")
    voucher_signature: Mapped[str | None] = mapped_column(String(132), nullable=True)
    redeemed: Mapped[str] = mapped_column(String(78), default="0")
    updated_at: Mapped[int] = mapped_column(Integer, default=0)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A tree size and root the node committed to (and, once posted, the transaction)."""

    node: str
    tree_size: int
    root: str
    created_at: int
    epoch: int | None = None
    tx_hash: str | None = None


@dataclasses.dataclass(frozen=True)
class ReceiptCredit:
    """The adapter credit of receipt `(node, seq)`, to keep unless one is stored already."""

    node: str
    seq: int
    request_id: str
    credit: AdapterCredit

    def row(self) -> dict[str, Any]:
        return {"node": self.node, "seq": self.seq, "request_id": self.request_id.lower(),
                "credit": json.dumps(self.credit.to_json(), sort_keys=True, separators=(",", ":"))}


@dataclasses.dataclass(frozen=True)
class ChannelVoucher:
    """A client's voucher on a channel, to keep if it pays more than the one stored."""

    channel_id: str
    client: str
    cumulative_amount: int
    signature: str


@dataclasses.dataclass(frozen=True)
class ChannelRecord:
    """The node's durable view of one payment channel."""

    channel_id: str
    client: str
    deposit_seen: int
    voucher_amount: int
    voucher_signature: str | None
    redeemed: int


def make_engine(url: str, schema: str | None = None) -> Engine:
    """An engine for `sqlite:///path` (WAL, synchronous=FULL) or `postgresql+psycopg://...`.

    `schema` places the tables in a PostgreSQL schema (tests use one per run).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit has reached the disk when it returns, so a receipt handed out is durable.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if schema:
        engine = engine.execution_options(schema_translate_map={None: schema})
    return engine


class ReceiptStore:
    """Rows in, rows out: the log's persistence, with no knowledge of signing."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        Base.metadata.create_all(engine)
        # SQLite has one writer at a time, and a writer that finds the database locked sleeps 1, 2, 5, 10 ms...
        # before retrying: receipts, vouchers and credits written from several threads would queue that way.
        # A lock in the process hands the turn over at once instead.
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        self._insert_new_statements: dict[type[Base], Any] = {}

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One write transaction, committed on exit (durable when it returns)."""
        with self._write_lock, self.engine.begin() as connection:
            yield connection

    @classmethod
    def open(cls, url: str, schema: str | None = None) -> ReceiptStore:
        return cls(make_engine(url, schema))

    def close(self) -> None:
        self.engine.dispose()

    # receipts
    def insert_receipts(self, signed: Sequence[SignedReceipt], vouchers: Sequence[ChannelVoucher] = (),
                        credits: Sequence[ReceiptCredit] = ()) -> None:
        """Insert all in one transaction, with `vouchers` and `credits` kept as `record_voucher` and
        `add_adapter_credits` would; returns once committed (durable). A paid request's voucher and the credits
        computed since the last receipt ride in its transaction: one commit instead of three."""
        rows = [{
            "node": s.receipt.node, "seq": s.receipt.seq, "request_id": s.receipt.request_id,
            "channel_id": s.receipt.channel_id, "price": str(s.receipt.price), "digest": s.digest,
            "leaf_hash": s.leaf_hash, "body": s.to_canonical_json().decode(),
        } for s in signed]
        try:
            with self._writing() as connection:
                connection.execute(insert(ReceiptRow), rows)
                for voucher in vouchers:
                    self._keep_voucher(connection, voucher)
                for credit in credits:
                    self._insert_new(connection, AdapterCreditRow, credit.row())
        except IntegrityError as error:
            seqs = [r["seq"] for r in rows]
            raise LogConflict(f"seq {min(seqs)}..{max(seqs)} already taken for node {rows[0]['node']}: "
                              "another writer appends to this log") from error

    def leaf_hashes(self, node: str) -> list[tuple[int, bytes]]:
        with self.engine.connect() as connection:
            result = connection.execute(
                select(ReceiptRow.seq, ReceiptRow.leaf_hash).where(ReceiptRow.node == node).order_by(ReceiptRow.seq))
            return [(seq, bytes(h)) for seq, h in result]

    def nodes(self) -> list[str]:
        """The nodes whose receipts this store holds (usually one)."""
        with self.engine.connect() as connection:
            return list(connection.scalars(select(ReceiptRow.node).distinct().order_by(ReceiptRow.node)))

    def load_tree(self, node: str) -> MerkleLog:
        """Rebuild a node's Merkle tree from its stored leaf hashes, refusing a log with a gap."""
        tree = MerkleLog()
        for seq, leaf in self.leaf_hashes(node):
            if seq != tree.size:
                raise StoreError(f"log of node {node} has a gap: seq {seq} follows {tree.size - 1}")
            tree.append(leaf)
        return tree

    def receipt_body(self, node: str, seq: int) -> str | None:
        with self.engine.connect() as connection:
            return connection.scalar(select(ReceiptRow.body).where(ReceiptRow.node == node, ReceiptRow.seq == seq))

    def bodies_for_request(self, request_id: str) -> list[str]:
        """Bodies as served: the stored body, with its adapter credit filled in once the annex holds one."""
        with self.engine.connect() as connection:
            rows = connection.execute(_with_credit(select(ReceiptRow.body, AdapterCreditRow.credit))
                                      .where(ReceiptRow.request_id == request_id.lower()))
            return [_served_body(body, credit) for body, credit in rows]

    def bodies(self, node: str, start: int = 0, limit: int = 100) -> list[str]:
        """Bodies as served (see `bodies_for_request`), in `seq` order."""
        with self.engine.connect() as connection:
            rows = connection.execute(_with_credit(select(ReceiptRow.body, AdapterCreditRow.credit)).where(
                ReceiptRow.node == node, ReceiptRow.seq >= start).order_by(ReceiptRow.seq).limit(limit))
            return [_served_body(body, credit) for body, credit in rows]

    # adapter credit (an annex of the log: evidence, not covered by the signature)
    def add_adapter_credit(self, node: str, seq: int, request_id: str, credit: AdapterCredit) -> bool:
        """Keep the credit of receipt `(node, seq)`; the first one stored stays. Returns whether it was kept."""
        return self.add_adapter_credits([ReceiptCredit(node, seq, request_id, credit)]) == 1

    def add_adapter_credits(self, credits: Sequence[ReceiptCredit]) -> int:
        """Keep each credit unless its receipt has one already, in one transaction; returns how many were kept."""
        with self._writing() as connection:
            return sum(self._insert_new(connection, AdapterCreditRow, credit.row()) for credit in credits)

    def _insert_new(self, connection: Connection, table: type[Base], values: dict[str, Any]) -> bool:
        """Insert a row unless its key is taken (then nothing changes); returns whether it was inserted."""
        upsert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}.get(self.engine.dialect.name)
        if upsert is None:
            try:
                with connection.begin_nested():
                    connection.execute(insert(table), values)
            except IntegrityError:
                return False
            return True
        # ON CONFLICT DO NOTHING: a taken key is a normal outcome, not an error that would end the transaction.
        # RETURNING: psycopg reports no rowcount for this statement. Built once per table (see _RAISE_VOUCHER).
        statement = self._insert_new_statements.get(table)
        if statement is None:
            key = table.__table__.primary_key.columns.values()[0]
            statement = upsert(table).on_conflict_do_nothing().returning(key)
            self._insert_new_statements[table] = statement
        return connection.execute(statement, values).first() is not None

    def adapter_credit(self, node: str, seq: int) -> AdapterCredit | None:
        with self.engine.connect() as connection:
            text = connection.scalar(select(AdapterCreditRow.credit).where(
                AdapterCreditRow.node == node, AdapterCreditRow.seq == seq))
        return AdapterCredit.from_json(json.loads(text)) if text else None

    def channel_total(self, node: str, channel_id: str) -> int:
        """Sum of the prices of this node's receipts on a channel: what the client owes in total."""
        with self.engine.connect() as connection:
            prices = connection.scalars(select(ReceiptRow.price).where(
                ReceiptRow.node == node, ReceiptRow.channel_id == channel_id.lower()))
            return sum(int(p) for p in prices)

    # checkpoints
    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._writing() as connection:
            connection.execute(insert(CheckpointRow).values(
                node=checkpoint.node, tree_size=checkpoint.tree_size, root=bytes.fromhex(checkpoint.root[2:]),
                created_at=checkpoint.created_at, epoch=checkpoint.epoch, tx_hash=checkpoint.tx_hash))

    def set_checkpoint_tx(self, node: str, tree_size: int, tx_hash: str) -> None:
        with self._writing() as connection:
            connection.execute(update(CheckpointRow).where(
                CheckpointRow.node == node, CheckpointRow.tree_size == tree_size).values(tx_hash=tx_hash))

    def checkpoints(self, node: str) -> list[Checkpoint]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(CheckpointRow).where(CheckpointRow.node == node)
                                      .order_by(CheckpointRow.tree_size))
            return [Checkpoint(r.node, r.tree_size, "0x" + bytes(r.root).hex(), r.created_at, r.epoch, r.tx_hash)
                    for r in rows]

    # channels
    def channel(self, channel_id: str) -> ChannelRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(ChannelRow).where(ChannelRow.channel_id == channel_id.lower())).first()
        if row is None:
            return None
        return ChannelRecord(row.channel_id, row.client, int(row.deposit_seen), int(row.voucher_amount),
                             row.voucher_signature, int(row.redeemed))

    def _upsert_channel(self, connection: Connection, channel_id: str, client: str, only_if: Any = None,
                        **values: Any) -> bool:
        """Write `values` to the channel's row (created if missing) within `connection`'s transaction; with
        `only_if`, an existing row is changed only where that condition holds. Returns whether anything was
        written."""
        channel_id = channel_id.lower()
        values = {k: str(v) if isinstance(v, int) else v for k, v in values.items()}
        update_row = update(ChannelRow).where(ChannelRow.channel_id == channel_id,
                                              *(() if only_if is None else (only_if,)))
        if connection.execute(update_row.values(updated_at=int(time.time()), **values)).rowcount:
            return True
        if self._insert_new(connection, ChannelRow, {"channel_id": channel_id, "client": client,
                                                     "updated_at": int(time.time()), **values}):
            return True
        # The row exists after all (another writer made it meanwhile, or `only_if` kept it): update it as asked.
        return bool(connection.execute(update_row.values(updated_at=int(time.time()), **values)).rowcount)

    def record_deposit(self, channel_id: str, client: str, deposit: int) -> None:
        with self._writing() as connection:
            self._upsert_channel(connection, channel_id, client, deposit_seen=deposit)

    def record_voucher(self, channel_id: str, client: str, cumulative_amount: int, signature: str) -> bool:
        """Keep the voucher if it is the highest seen; returns whether it was kept (one transaction)."""
        with self._writing() as connection:
            return self._keep_voucher(connection, ChannelVoucher(channel_id, client, cumulative_amount, signature))

    def _keep_voucher(self, connection: Connection, voucher: ChannelVoucher) -> bool:
        """Usually one UPDATE that applies only to a lower stored amount, so the check and the write cannot
        interleave with another writer's (then an insert for a new channel)."""
        amount = str(voucher.cumulative_amount)
        channel_id = voucher.channel_id.lower()
        raised = connection.execute(_RAISE_VOUCHER, {
            "channel": channel_id, "amount": amount, "signature": voucher.signature, "now": int(time.time())}).rowcount
        if raised:
            return True
        return self._upsert_channel(connection, channel_id, voucher.client, only_if=_pays_more(amount),
                                    voucher_amount=amount, voucher_signature=voucher.signature)

    def record_redeemed(self, channel_id: str, client: str, redeemed: int) -> None:
        with self._writing() as connection:
            self._upsert_channel(connection, channel_id, client, redeemed=redeemed)


def _pays_more(amount: str | BindParameter) -> ColumnElement[bool]:
    """The stored voucher is lower than `amount`. Amounts are decimal strings (uint256 outgrows SQL integers):
    without leading zeros a longer string is the larger number, and equal lengths compare as text."""
    stored = ChannelRow.voucher_amount
    digits = func.length(amount) if isinstance(amount, BindParameter) else len(amount)
    return (func.length(stored) < digits) | ((func.length(stored) == digits) & (stored < amount))


# Built once: a voucher is stored with every paid request, and building the statement costs more CPU on the event
# loop than running it (SQLAlchemy's coercions for each operator).
_RAISE_VOUCHER = update(ChannelRow).where(
    ChannelRow.channel_id == bindparam("channel"), _pays_more(bindparam("amount", type_=String))).values(
    voucher_amount=bindparam("amount"), voucher_signature=bindparam("signature"), updated_at=bindparam("now"))


def _with_credit(query):
    return query.outerjoin(AdapterCreditRow, (AdapterCreditRow.node == ReceiptRow.node)
                           & (AdapterCreditRow.seq == ReceiptRow.seq))


def _served_body(body: str, credit: str | None) -> str:
    """The canonical body with `adapterCredit` from the annex (the digest and signature do not cover it)."""
    if credit is None:
        return body
    data = json.loads(body)
    data["adapterCredit"] = json.loads(credit)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ReceiptLog:
    """One node's receipt log: assigns `seq`, signs, persists, and answers roots and proofs.

    One writer per node log: `seq` is assigned in memory under a lock, and the
    store's unique `(node, seq)` key turns a second writer into `LogConflict`
    instead of a fork. A receipt is returned only after its transaction committed.
    """

    def __init__(self, store: ReceiptStore, signer: ReceiptSigner) -> None:
        self.store = store
        self.signer = signer
        self.node = signer.address
        self._lock = threading.Lock()
        self.tree = store.load_tree(self.node)

    @classmethod
    def open(cls, url: str, private_key: bytes | str, domain: ReceiptDomain, schema: str | None = None) -> ReceiptLog:
        return cls(ReceiptStore.open(url, schema), ReceiptSigner(private_key, domain))

    def close(self) -> None:
        self.store.close()

    @property
    def size(self) -> int:
        return self.tree.size

    @property
    def domain(self) -> ReceiptDomain:
        return self.signer.domain

    def append(self, draft: ReceiptDraft, vouchers: Sequence[ChannelVoucher] = (),
               credits: Sequence[ReceiptCredit] = ()) -> SignedReceipt:
        """Sign and durably store one receipt (`vouchers` and `credits` in the same commit); returns it with its
        `seq`."""
        return self.append_many([draft], vouchers, credits)[0]

    def append_many(self, drafts: Sequence[ReceiptDraft], vouchers: Sequence[ChannelVoucher] = (),
                    credits: Sequence[ReceiptCredit] = ()) -> list[SignedReceipt]:
        """Sign a batch with consecutive `seq`s and commit it once (group commit), `vouchers` and `credits` with
        it; durable on return."""
        if not drafts:
            return []
        with self._lock:
            start = self.tree.size
            signed = [self.signer.sign(d.to_receipt(self.node, start + i), d.attribution, d.spans, d.adapter_credit)
                      for i, d in enumerate(drafts)]
            self.store.insert_receipts(signed, vouchers, credits)
            # Only a committed batch enters the in-memory tree, so a failed commit leaves no trace.
            for s in signed:
                self.tree.append(s.leaf_hash)
            return signed

    def get(self, seq: int) -> SignedReceipt:
        body = self.store.receipt_body(self.node, seq)
        if body is None:
            raise KeyError(f"no receipt with seq {seq} in the log of node {self.node} (size {self.size})")
        return SignedReceipt.from_json(body)

    def root(self, size: int | None = None) -> bytes:
        return self.tree.root(size)

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        return self.tree.inclusion_proof(seq, size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        return self.tree.consistency_proof(old_size, new_size)

    def checkpoint(self, epoch: int | None = None) -> Checkpoint:
        """Record the current size and root as a checkpoint (posting it on chain is the node's job)."""
        with self._lock:
            checkpoint = Checkpoint(self.node, self.size, "0x" + self.root().hex(), int(time.time()), epoch)
            self.store.add_checkpoint(checkpoint)
            return checkpoint

    def verify(self) -> int:
        """Re-read every body, check its signature and that it hashes to the stored leaf; returns the count."""
        from attribution.receipts import verify_receipt

        for seq in range(self.size):
            signed = self.get(seq)
            verify_receipt(signed, self.domain, expected_signer=self.node)
            if signed.receipt.seq != seq or leaf_hash(signed.digest) != self.tree.leaf(seq):
                raise StoreError(f"receipt at seq {seq} does not match leaf {seq} of the log")
        return self.size
