"""The synthetic Datanets and their manifests: deterministic, verifiable, distinct by domain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from longtail.attribution.datanets import (
    DatanetError,
    Record,
    build_manifest,
    datanet_id,
    read_records,
    records_root,
    verify_datanet,
)
from longtail.attribution.merkle import root_hash
from longtail.attribution.synthetic import DOMAINS, generate_all, generate_records

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "datanets"


def test_shipped_datanets_verify_and_match_the_generator(tmp_path):
    regenerated = generate_all(tmp_path)
    assert set(regenerated) == set(DOMAINS) and len(regenerated) >= 4
    for name, ident in regenerated.items():
        manifest = verify_datanet(SHIPPED / name)
        assert manifest.datanet_id == ident, f"{name}: shipped data drifted from the generator"
        assert (SHIPPED / name / "records.jsonl").read_bytes() == (tmp_path / name / "records.jsonl").read_bytes()


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_each_datanet_has_size_contributors_and_unique_ids(name):
    records = read_records(SHIPPED / name)
    size = (SHIPPED / name / "records.jsonl").stat().st_size
    assert 500_000 <= size <= 2_000_000
    assert len({r.contributor for r in records}) >= 20
    assert len({r.id for r in records}) == len(records)


def test_domains_have_long_spans_found_in_no_other_domain():
    texts = {name: " ".join(r.text for r in read_records(SHIPPED / name)[:300]) for name in DOMAINS}
    for name in texts:
        # A 60-character window from the middle of a record belongs to its own domain only.
        record = read_records(SHIPPED / name)[7].text
        window = record[len(record) // 2: len(record) // 2 + 60]
        others = [other for other, other_text in texts.items() if other != name and window in other_text]
        assert not others, f"span {window!r} of {name} also occurs in {others}"


def test_generator_is_deterministic_per_seed():
    make_text = DOMAINS["kitchen-recipes"][1]
    first = generate_records("kitchen-recipes", make_text, seed=7, target_bytes=20_000)
    again = generate_records("kitchen-recipes", make_text, seed=7, target_bytes=20_000)
    other = generate_records("kitchen-recipes", make_text, seed=8, target_bytes=20_000)
    assert first == again
    assert first != other


def test_datanet_id_matches_the_abi_encoding_fixed_in_interfaces():
    from eth_abi import encode
    from eth_utils import keccak

    records = [Record("a", "first text", "0x" + "11" * 20), Record("b", "second", "0x" + "22" * 20)]
    manifest = build_manifest("tiny", "0x" + "33" * 20, records)
    root = root_hash([r.canonical_bytes() for r in records])
    assert manifest.records_root == "0x" + root.hex()
    expected = keccak(encode(["string", "address", "bytes32", "uint256"],
                             ["tiny", "0x" + "33" * 20, root, 2]))
    assert manifest.datanet_id == "0x" + expected.hex()
    assert datanet_id("tiny", "0x" + "33" * 20, records_root(records), 2) == manifest.datanet_id


def test_a_tampered_record_fails_verification(tmp_path):
    folder = tmp_path / "legal"
    shutil.copytree(SHIPPED / "legal-clauses", folder)
    lines = (folder / "records.jsonl").read_text().splitlines()
    record = json.loads(lines[3])
    record["text"] = record["text"].replace("shall", "may", 1)
    lines[3] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatanetError, match="records root"):
        verify_datanet(folder)


def test_a_record_without_a_contributor_address_is_rejected(tmp_path):
    (tmp_path / "records.jsonl").write_text('{"id": "x", "text": "t", "contributor": "alice"}\n')
    with pytest.raises(DatanetError, match="line 1: contributor 'alice' is not an address"):
        read_records(tmp_path)
