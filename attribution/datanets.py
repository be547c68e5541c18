"""Datanets on disk: records, their SHA-256 Merkle root, the manifest and the datanetId.

A Datanet is a folder holding `records.jsonl` (`{"id", "text", "contributor"}`
per line) and `manifest.json`. The encodings are fixed in docs/interfaces.md so
that the Registry contract can recompute the id from the same four fields.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from eth_abi import encode as abi_encode
from eth_utils import is_checksum_address, is_hex_address, keccak, to_checksum_address

from longtail.attribution.merkle import root_hash

RECORDS_FILE = "records.jsonl"
MANIFEST_FILE = "manifest.json"


class DatanetError(ValueError):
    """A Datanet folder, record or manifest is malformed or does not match its id."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One contributed record: its id, its text and who contributed it."""

    id: str
    text: str
    contributor: str

    def canonical_bytes(self) -> bytes:
        """The record's Merkle leaf data: sorted-key compact UTF-8 JSON."""
        return canonical_json(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a Datanet commits to; `datanet_id` is derived, never chosen."""

    name: str
    owner: str
    records_root: str
    record_count: int
    domain: str = ""
    seed: int | None = None

    @property
    def datanet_id(self) -> str:
        return datanet_id(self.name, self.owner, bytes.fromhex(self.records_root[2:]), self.record_count)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "datanet_id": self.datanet_id}

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        try:
            manifest = cls(
                name=str(data["name"]),
                owner=to_checksum_address(data["owner"]),
                records_root=str(data["records_root"]).lower(),
                record_count=int(data["record_count"]),
                domain=str(data.get("domain", "")),
                seed=data.get("seed"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DatanetError(f"malformed manifest: {error}") from error
        claimed = data.get("datanet_id")
        if claimed is not None and claimed.lower() != manifest.datanet_id:
            raise DatanetError(f"manifest datanet_id {claimed} does not match its fields ({manifest.datanet_id})")
        return manifest


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def datanet_id(name: str, owner: str, records_root: bytes, record_count: int) -> str:
    """keccak256(abi.encode(string name, address owner, bytes32 recordsRoot, uint256 recordCount))."""
    encoded = abi_encode(
        ["string", "address", "bytes32", "uint256"],
        [name, to_checksum_address(owner), records_root, record_count],
    )
    return "0x" + keccak(encoded).hex()


def records_root(records: Sequence[Record]) -> bytes:
    return root_hash([record.canonical_bytes() for record in records])


def parse_record(line: str, line_number: int) -> Record:
    try:
        data = json.loads(line)
        record = Record(id=str(data["id"]), text=str(data["text"]), contributor=str(data["contributor"]))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatanetError(f"line {line_number}: not a record {{id, text, contributor}}: {error}") from error
    if not is_hex_address(record.contributor):
        raise DatanetError(f"line {line_number}: contributor {record.contributor!r} is not an address")
    if not is_checksum_address(record.contributor):
        record = dataclasses.replace(record, contributor=to_checksum_address(record.contributor))
    return record


def read_records(folder: Path) -> list[Record]:
    path = Path(folder) / RECORDS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DatanetError(f"cannot read {path}: {error}") from error
    return [parse_record(line, n) for n, line in enumerate(lines, start=1) if line.strip()]


def build_manifest(name: str, owner: str, records: Sequence[Record], domain: str = "", seed: int | None = None) -> Manifest:
    return Manifest(
        name=name,
        owner=to_checksum_address(owner),
        records_root="0x" + records_root(records).hex(),
        record_count=len(records),
        domain=domain,
        seed=seed,
    )


def write_datanet(folder: Path, manifest: Manifest, records: Iterable[Record]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / RECORDS_FILE).open("w", encoding="utf-8") as out:
        for record in records:
            out.write(canonical_json(dataclasses.asdict(record)).decode("utf-8") + "\n")
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


def load_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_FILE
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as error:
        raise DatanetError(f"cannot read {path}: {error}") from error


def verify_datanet(folder: Path) -> Manifest:
    """Recompute the records root and count and check them against the manifest."""
    manifest = load_manifest(folder)
    records = read_records(folder)
    root = "0x" + records_root(records).hex()
    if root != manifest.records_root:
        raise DatanetError(f"{folder}: records root {root} does not match the manifest's {manifest.records_root}")
    if len(records) != manifest.record_count:
        raise DatanetError(f"{folder}: {len(records)} records, manifest says {manifest.record_count}")
    return manifest


def build_datanet(folder: Path, name: str, owner: str, domain: str = "") -> Manifest:
    """Write the manifest for a folder that already holds `records.jsonl`."""
    records = read_records(folder)
    manifest = build_manifest(name, owner, records, domain=domain)
    (Path(folder) / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest
