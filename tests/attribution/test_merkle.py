"""RFC 9162 Merkle tree: roots, inclusion and consistency proofs against the RFC's own definitions.

The reference below is the RFC's recursive text transcribed literally (MTH, PATH,
SUBPROOF over raw leaf lists); the code under test is the iterative generation,
the incremental log and the RFC's iterative verifiers.
"""

from __future__ import annotations

import hashlib

import pytest

from longtail.attribution.log import MerkleLog
from longtail.attribution.merkle import (
    EMPTY_ROOT,
    InvalidProof,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

# --- the RFC 9162 §2.1 definitions, literally ---------------------------------------------------


def ref_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _k(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


def leaves_of(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() * (i % 3 + 1) for i in range(n)]


# --- the published Certificate Transparency vectors ------------------------------------------------
CT_LEAVES = [bytes.fromhex(x) for x in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [bytes.fromhex(x) for x in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# (leaf number, 1-based as in the CT sources; tree size; proof)
CT_INCLUSION = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]


def test_ct_roots_for_every_prefix_of_the_eight_leaf_vector():
    log = MerkleLog()
    for size in range(1, 9):
        log.append(leaf_hash(CT_LEAVES[size - 1]))
        assert root_hash(CT_LEAVES[:size]) == CT_ROOTS[size - 1]
        assert log.root() == CT_ROOTS[size - 1]
    assert [log.root(size) for size in range(1, 9)] == CT_ROOTS
    assert root_hash([]) == EMPTY_ROOT == MerkleLog().root()


@pytest.mark.parametrize("leaf_number, size, expected", CT_INCLUSION)
def test_ct_inclusion_vectors(leaf_number, size, expected):
    hashes = [leaf_hash(d) for d in CT_LEAVES[:size]]
    proof = inclusion_proof(hashes, leaf_number - 1)
    assert [p.hex() for p in proof] == expected
    assert MerkleLog(leaf_hash(d) for d in CT_LEAVES).inclusion_proof(leaf_number - 1, size) == proof
    verify_inclusion(leaf_number - 1, size, hashes[leaf_number - 1], proof, CT_ROOTS[size - 1])


@pytest.mark.parametrize("old, new, expected", CT_CONSISTENCY)
def test_ct_consistency_vectors(old, new, expected):
    hashes = [leaf_hash(d) for d in CT_LEAVES[:new]]
    proof = consistency_proof(hashes, old)
    assert [p.hex() for p in proof] == expected
    assert MerkleLog(leaf_hash(d) for d in CT_LEAVES).consistency_proof(old, new) == proof
    verify_consistency(old, new, CT_ROOTS[old - 1], CT_ROOTS[new - 1], proof)


def flipped(proof: list[bytes], position: int, bit: int) -> list[bytes]:
    changed = bytearray(proof[position])
    changed[bit // 8] ^= 1 << (bit % 8)
    return proof[:position] + [bytes(changed)] + proof[position + 1:]


def test_every_leaf_of_every_size_up_to_64_matches_the_rfc_and_verifies():
    data = leaves_of(64)
    log = MerkleLog()
    for size in range(1, 65):
        log.append(leaf_hash(data[size - 1]))
        prefix = data[:size]
        root = ref_mth(prefix)
        assert log.root() == root == root_hash(prefix)
        for index in range(size):
            expected = ref_path(index, prefix)
            proof = log.inclusion_proof(index)
            assert proof == expected, (index, size)
            verify_inclusion(index, size, leaf_hash(data[index]), proof, root)


def test_past_sizes_are_answered_after_more_appends():
    data = leaves_of(64)
    log = MerkleLog(leaf_hash(d) for d in data)
    for size in range(1, 65):
        assert log.root(size) == ref_mth(data[:size])
        for index in range(0, size, 7):
            assert log.inclusion_proof(index, size) == ref_path(index, data[:size])


def test_any_flipped_bit_or_wrong_position_fails_inclusion():
    data = leaves_of(64)
    log = MerkleLog(leaf_hash(d) for d in data)
    for size in (1, 2, 3, 5, 8, 13, 31, 32, 33, 64):
        root = log.root(size)
        for index in range(size):
            leaf = log.leaf(index)
            proof = log.inclusion_proof(index, size)
            for position in range(len(proof)):
                for bit in (0, 77, 255):
                    with pytest.raises(InvalidProof):
                        verify_inclusion(index, size, leaf, flipped(proof, position, bit), root)
            for bit in (0, 130, 255):
                with pytest.raises(InvalidProof):
                    verify_inclusion(index, size, flipped([leaf], 0, bit)[0], proof, root)
                with pytest.raises(InvalidProof):
                    verify_inclusion(index, size, leaf, proof, flipped([root], 0, bit)[0])
            if size > 1:
                with pytest.raises(InvalidProof):
                    verify_inclusion((index + 1) % size, size, leaf, proof, root)
            with pytest.raises(InvalidProof):
                verify_inclusion(index, size, leaf, proof + [root], root)
            if proof:
                with pytest.raises(InvalidProof):
                    verify_inclusion(index, size, leaf, proof[:-1], root)


def test_consistency_for_all_pairs_up_to_64_matches_the_rfc_and_verifies():
    data = leaves_of(64)
    log = MerkleLog(leaf_hash(d) for d in data)
    roots = [ref_mth(data[:n]) for n in range(65)]
    for new in range(1, 65):
        for old in range(1, new + 1):
            proof = log.consistency_proof(old, new)
            assert proof == ref_proof(old, data[:new]), (old, new)
            verify_consistency(old, new, roots[old], roots[new], proof)
            if old < new:
                position = (old * 7 + new) % len(proof)
                with pytest.raises(InvalidProof):
                    verify_consistency(old, new, roots[old], roots[new], flipped(proof, position, (old + new) % 256))
                with pytest.raises(InvalidProof):
                    verify_consistency(old, new, flipped([roots[old]], 0, 3)[0], roots[new], proof)
                with pytest.raises(InvalidProof):
                    verify_consistency(old, new, roots[old], flipped([roots[new]], 0, 200)[0], proof)
                with pytest.raises(InvalidProof):
                    verify_consistency(old, new, roots[old], roots[new], proof[:-1])
                with pytest.raises(InvalidProof):
                    verify_consistency(old, new, roots[old], roots[new], proof + [roots[new]])


def test_every_bit_of_a_consistency_proof_matters():
    data = leaves_of(64)
    log = MerkleLog(leaf_hash(d) for d in data)
    for old, new in ((1, 64), (7, 64), (32, 33), (33, 64), (21, 50)):
        proof = log.consistency_proof(old, new)
        for position in range(len(proof)):
            for bit in range(256):
                with pytest.raises(InvalidProof):
                    verify_consistency(old, new, log.root(old), log.root(new), flipped(proof, position, bit))


def test_edge_cases_follow_ct_verifiers():
    one = MerkleLog([leaf_hash(b"data")])
    verify_inclusion(0, 1, leaf_hash(b"data"), [], one.root())
    with pytest.raises(InvalidProof, match="outside"):
        verify_inclusion(1, 1, leaf_hash(b"data"), [], one.root())
    with pytest.raises(InvalidProof, match="32 bytes"):
        verify_inclusion(0, 1, b"", [], one.root())
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(InvalidProof, match="empty tree"):
        verify_consistency(0, 1, EMPTY_ROOT, one.root(), [])
    with pytest.raises(InvalidProof, match="larger"):
        verify_consistency(2, 1, one.root(), one.root(), [])
    with pytest.raises(InvalidProof, match="roots differ"):
        verify_consistency(1, 1, one.root(), EMPTY_ROOT, [])
    with pytest.raises(InvalidProof, match="not empty"):
        verify_consistency(1, 1, one.root(), one.root(), [EMPTY_ROOT])
    with pytest.raises(ValueError):
        one.consistency_proof(0, 1)
    with pytest.raises(IndexError):
        one.inclusion_proof(0, 2)


def test_pure_root_helpers_agree_with_the_log():
    hashes = [leaf_hash(d) for d in leaves_of(100)]
    assert root_from_leaf_hashes(hashes) == MerkleLog(hashes).root() == ref_mth(leaves_of(100))
    assert node_hash(hashes[0], hashes[1]) == MerkleLog(hashes[:2]).root()
