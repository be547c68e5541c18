"""The receipt log's SQL store and the `ReceiptLog` that signs, persists and proves receipts.

Tables: `receipts` (one row per signed receipt, unique `(node, seq)`),
`checkpoints` (tree sizes and roots the node committed to) and
`channels` (payment channel state the node has seen). SQLite in WAL mode with
`synchronous=FULL` by default, PostgreSQL by URL, through the same models and
the same statements: PostgreSQL runs them through SQLAlchemy's execution,
SQLite's writes run them compiled once on the driver (`_DriverWrites`).

The Merkle tree is not stored node by node: each receipt row carries its leaf
hash, and opening a log reads that one column and rebuilds the tree in memory
(about a second per million receipts), then checks it has no gap. A tree
persisted node by node would cost a second write per receipt on the hot path
to save that second at start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

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
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from longtail.attribution.log import MerkleLog
from longtail.attribution.merkle import leaf_hash
from longtail.attribution.receipts import (
    ReceiptDomain,
    ReceiptDraft,
    ReceiptSigner,
    SignedReceipt,
)


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
        # before retrying: receipts and vouchers written from several threads would queue that way.
        # A lock in the process hands the turn over at once instead.
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        self._insert_new = _insert_new_statements(engine.dialect.name)
        # SQLite (the embedded default) writes on one connection of its own, through the driver: see _DriverWrites.
        self._driver = _DriverWrites(engine) if engine.dialect.name == "sqlite" else None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Writes]:
        """One write transaction, committed on exit (durable when it returns)."""
        if self._driver is not None:
            with self._write_lock, self._driver.transaction():
                yield self._driver
            return
        with self.engine.begin() as connection:
            yield _CoreWrites(connection)

    @classmethod
    def open(cls, url: str, schema: str | None = None) -> ReceiptStore:
        return cls(make_engine(url, schema))

    def close(self) -> None:
        if self._driver is not None:
            with self._write_lock:  # a write still running on another thread finishes first
                self._driver.close()
        self.engine.dispose()

    # receipts
    def insert_receipts(self, signed: Sequence[SignedReceipt], vouchers: Sequence[ChannelVoucher] = ()) -> None:
        """Insert all in one transaction, with `vouchers` kept as `record_voucher` would; returns once committed
        (durable). A paid request's voucher rides in its receipt's transaction: one commit instead of two."""
        rows = [{
            "node": s.receipt.node, "seq": s.receipt.seq, "request_id": s.receipt.request_id,
            "channel_id": s.receipt.channel_id, "price": str(s.receipt.price), "digest": s.digest,
            "leaf_hash": s.leaf_hash, "body": s.to_canonical_json().decode(),
        } for s in signed]
        try:
            with self._writing() as writes:
                writes.run_many(_INSERT_RECEIPT, rows)
                for voucher in vouchers:
                    self._keep_voucher(writes, voucher)
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
        """The stored bodies of the receipts with this request id."""
        with self.engine.connect() as connection:
            return list(connection.scalars(select(ReceiptRow.body).where(ReceiptRow.request_id == request_id.lower())))

    def bodies(self, node: str, start: int = 0, limit: int = 100) -> list[str]:
        """Stored bodies in `seq` order."""
        with self.engine.connect() as connection:
            return list(connection.scalars(select(ReceiptRow.body).where(
                ReceiptRow.node == node, ReceiptRow.seq >= start).order_by(ReceiptRow.seq).limit(limit)))

    def _add_new(self, writes: _Writes, table: type[Base], values: dict[str, Any]) -> bool:
        """Insert a row unless its key is taken (then nothing changes); returns whether it was inserted."""
        statement = self._insert_new.get(table)
        if statement is not None:
            return writes.run(statement, values) > 0
        try:  # a dialect without ON CONFLICT: the taken key raises, inside a savepoint
            with writes.savepoint():
                writes.run(insert(table), values)
        except IntegrityError:
            return False
        return True

    def channel_total(self, node: str, channel_id: str) -> int:
        """Sum of the prices of this node's receipts on a channel: what the client owes in total."""
        with self.engine.connect() as connection:
            prices = connection.scalars(select(ReceiptRow.price).where(
                ReceiptRow.node == node, ReceiptRow.channel_id == channel_id.lower()))
            return sum(int(p) for p in prices)

    # checkpoints
    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._writing() as writes:
            writes.run(_INSERT_CHECKPOINT, {
                "node": checkpoint.node, "tree_size": checkpoint.tree_size, "root": bytes.fromhex(checkpoint.root[2:]),
                "created_at": checkpoint.created_at, "epoch": checkpoint.epoch, "tx_hash": checkpoint.tx_hash})

    def set_checkpoint_tx(self, node: str, tree_size: int, tx_hash: str) -> None:
        with self._writing() as writes:
            writes.run(_SET_CHECKPOINT_TX, {"checkpoint_node": node, "checkpoint_size": tree_size, "tx_hash": tx_hash})

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

    def _upsert_channel(self, writes: _Writes, channel_id: str, client: str, **values: Any) -> None:
        """Write `values` to the channel's row, created if missing, within `writes`' transaction."""
        values = {k: str(v) if isinstance(v, int) else v for k, v in values.items()}
        params = {"channel": channel_id.lower(), "updated_at": int(time.time()), **values}
        if writes.run(_UPDATE_CHANNEL, params):
            return
        if not self._add_new(writes, ChannelRow, {"channel_id": channel_id.lower(), "client": client,
                                                  "updated_at": params["updated_at"], **values}):
            writes.run(_UPDATE_CHANNEL, params)  # another writer made the row meanwhile

    def record_deposit(self, channel_id: str, client: str, deposit: int) -> None:
        with self._writing() as writes:
            self._upsert_channel(writes, channel_id, client, deposit_seen=deposit)

    def record_voucher(self, channel_id: str, client: str, cumulative_amount: int, signature: str) -> bool:
        """Keep the voucher if it is the highest seen; returns whether it was kept (one transaction)."""
        with self._writing() as writes:
            return self._keep_voucher(writes, ChannelVoucher(channel_id, client, cumulative_amount, signature))

    def _keep_voucher(self, writes: _Writes, voucher: ChannelVoucher) -> bool:
        """Usually one UPDATE that applies only to a lower stored amount, so the check and the write cannot
        interleave with another writer's; a new channel's row is inserted instead."""
        amount = str(voucher.cumulative_amount)
        channel_id = voucher.channel_id.lower()
        raise_params = {"channel": channel_id, "amount": amount, "signature": voucher.signature,
                        "now": int(time.time())}
        if writes.run(_RAISE_VOUCHER, raise_params):
            return True
        if self._add_new(writes, ChannelRow, {"channel_id": channel_id, "client": voucher.client,
                                              "voucher_amount": amount, "voucher_signature": voucher.signature,
                                              "updated_at": raise_params["now"]}):
            return True
        # The row exists: it holds a voucher as high, or another writer made it meanwhile (ask again).
        return writes.run(_RAISE_VOUCHER, raise_params) > 0

    def record_redeemed(self, channel_id: str, client: str, redeemed: int) -> None:
        with self._writing() as writes:
            self._upsert_channel(writes, channel_id, client, redeemed=redeemed)


# The write statements, built once: building a statement costs more CPU than running it (SQLAlchemy's coercions
# for each operator), and _DriverWrites compiles each once. Values come as parameters; an UPDATE without
# .values() sets the columns its parameters name.
_INSERT_RECEIPT = insert(ReceiptRow)
_INSERT_CHECKPOINT = insert(CheckpointRow)
_SET_CHECKPOINT_TX = update(CheckpointRow).where(CheckpointRow.node == bindparam("checkpoint_node"),
                                                 CheckpointRow.tree_size == bindparam("checkpoint_size"))
_UPDATE_CHANNEL = update(ChannelRow).where(ChannelRow.channel_id == bindparam("channel"))


def _pays_more(amount: BindParameter) -> ColumnElement[bool]:
    """The stored voucher is lower than `amount`. Amounts are decimal strings (uint256 outgrows SQL integers):
    without leading zeros a longer string is the larger number, and equal lengths compare as text."""
    stored = ChannelRow.voucher_amount
    return (func.length(stored) < func.length(amount)) | (
        (func.length(stored) == func.length(amount)) & (stored < amount))


_RAISE_VOUCHER = update(ChannelRow).where(
    ChannelRow.channel_id == bindparam("channel"), _pays_more(bindparam("amount", type_=String))).values(
    voucher_amount=bindparam("amount"), voucher_signature=bindparam("signature"), updated_at=bindparam("now"))


def _insert_new_statements(dialect: str) -> dict[type[Base], Any]:
    """Per table, an INSERT that does nothing when the key is taken (a normal outcome, not an error that would end
    the transaction); empty for a dialect without ON CONFLICT. On PostgreSQL with RETURNING: psycopg reports no
    rowcount for it."""
    tables = (ChannelRow,)
    if dialect == "sqlite":
        return {table: sqlite_insert(table).on_conflict_do_nothing() for table in tables}
    if dialect == "postgresql":
        return {table: postgresql_insert(table).on_conflict_do_nothing().returning(
            *table.__table__.primary_key.columns) for table in tables}
    return {}


class _Writes(Protocol):
    """One open write transaction: runs a statement with parameters, returns the rows it changed."""

    def run(self, statement: Executable, params: dict[str, Any]) -> int: ...

    def run_many(self, statement: Executable, rows: Sequence[dict[str, Any]]) -> None: ...

    def savepoint(self) -> contextlib.AbstractContextManager: ...


class _CoreWrites:
    """Through SQLAlchemy's execution: any dialect, PostgreSQL's schema map included."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def run(self, statement: Executable, params: dict[str, Any]) -> int:
        result = self.connection.execute(statement, params)
        return len(result.all()) if result.returns_rows else result.rowcount

    def run_many(self, statement: Executable, rows: Sequence[dict[str, Any]]) -> None:
        self.connection.execute(statement, list(rows))

    def savepoint(self) -> contextlib.AbstractContextManager:
        return self.connection.begin_nested()


class _DriverWrites:
    """SQLite's writes on one connection the store keeps, run by the sqlite3 driver: the same statements,
    compiled by SQLAlchemy once per statement and set of parameters.

    Why: a paid request's receipt and voucher are written on the node's event loop before its answer
    leaves, and SQLAlchemy's per-execution machinery (cache key, execution context, result) cost ~0.5 ms of the
    ~2 ms that took on this CPU, more than the SQL (docs/node.md). Callers hold the store's write lock, so one
    connection serves every thread in turn (SQLAlchemy opens SQLite files with check_same_thread off).
    """

    def __init__(self, engine: Engine) -> None:
        self._dialect = engine.dialect
        self._pooled = engine.raw_connection()  # the connect event applied WAL and synchronous=FULL to it
        self._connection: sqlite3.Connection = self._pooled.driver_connection
        self._cursor = self._connection.cursor()
        self._compiled: dict[tuple[Executable, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The driver begins a transaction before the first write; commit on exit, roll back on any error, a
        failed commit's included (else the next writer's commit would carry this one's rows)."""
        try:
            yield
            self._connection.commit()
        except BaseException:
            if self._connection.in_transaction:
                try:
                    self._connection.rollback()
                except sqlite3.Error:  # the connection is broken; the first error is the one to report
                    pass
            raise

    def run(self, statement: Executable, params: dict[str, Any]) -> int:
        sql, names, defaults = self._compile(statement, params)
        try:
            return self._cursor.execute(sql, [params.get(name, defaults.get(name)) for name in names]).rowcount
        except sqlite3.IntegrityError as error:  # the store's callers handle SQLAlchemy's type, whichever path
            raise IntegrityError(sql, params, error) from error

    def run_many(self, statement: Executable, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        sql, names, defaults = self._compile(statement, rows[0])
        try:
            self._cursor.executemany(sql, [[row.get(name, defaults.get(name)) for name in names] for row in rows])
        except sqlite3.IntegrityError as error:
            raise IntegrityError(sql, rows[0], error) from error

    def _compile(self, statement: Executable, params: dict[str, Any]) -> tuple[str, tuple[str, ...], dict]:
        """The SQL, its parameters' names in order, and the column defaults it takes from Python (which
        SQLAlchemy's execution would fill in: the models' `default=` values)."""
        key = (statement, tuple(params))
        compiled = self._compiled.get(key)
        if compiled is None:
            form = statement.compile(dialect=self._dialect, column_keys=list(params))
            defaults = {}
            for column in [*form.insert_prefetch, *form.update_prefetch]:
                if column.default is None or not column.default.is_scalar:
                    raise StoreError(f"column {column} needs a default SQLite's write path cannot compute")
                defaults[column.key] = column.default.arg
            compiled = self._compiled[key] = (form.string, tuple(form.positiontup or ()), defaults)
        return compiled

    def savepoint(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError("SQLite inserts use ON CONFLICT; no savepoint is needed")

    def close(self) -> None:
        self._cursor.close()
        self._pooled.close()


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

    def append(self, draft: ReceiptDraft, vouchers: Sequence[ChannelVoucher] = ()) -> SignedReceipt:
        """Sign and durably store one receipt (`vouchers` in the same commit); returns it with its `seq`."""
        return self.append_many([draft], vouchers)[0]

    def append_many(self, drafts: Sequence[ReceiptDraft], vouchers: Sequence[ChannelVoucher] = ()) \
            -> list[SignedReceipt]:
        """Sign a batch with consecutive `seq`s and commit it once (group commit), `vouchers` with it; durable on
        return."""
        if not drafts:
            return []
        with self._lock:
            start = self.tree.size
            signed = [self.signer.sign(d.to_receipt(self.node, start + i), d.attribution, d.spans)
                      for i, d in enumerate(drafts)]
            self.store.insert_receipts(signed, vouchers)
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
        from longtail.attribution.receipts import verify_receipt

        for seq in range(self.size):
            signed = self.get(seq)
            verify_receipt(signed, self.domain, expected_signer=self.node)
            if signed.receipt.seq != seq or leaf_hash(signed.digest) != self.tree.leaf(seq):
                raise StoreError(f"receipt at seq {seq} does not match leaf {seq} of the log")
        return self.size
