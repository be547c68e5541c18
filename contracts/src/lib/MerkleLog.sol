// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title MerkleLog
/// @notice Verifiers for RFC 9162 §2.1 Merkle trees (Certificate Transparency v2): leaf hash
///         SHA-256(0x00 || data), node hash SHA-256(0x01 || left || right). The loops follow the RFC's
///         verification algorithms (§2.1.3.2 inclusion, §2.1.4.2 consistency) step by step.
library MerkleLog {
    /// @dev SHA-256(0x00 || data) of 32 bytes of leaf data (a receipt digest).
    function leafHash(bytes32 data) internal pure returns (bytes32) {
        return sha256(abi.encodePacked(bytes1(0x00), data));
    }

    /// @dev SHA-256(0x00 || data) of arbitrary leaf data (a distribution entry).
    function leafHashOf(bytes memory data) internal pure returns (bytes32) {
        return sha256(abi.encodePacked(bytes1(0x00), data));
    }

    function _node(bytes32 left, bytes32 right) private view returns (bytes32 result) {
        // sha256 precompile (0x02) over 0x01 || left || right, without abi.encodePacked's memory growth.
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore8(ptr, 0x01)
            mstore(add(ptr, 0x01), left)
            mstore(add(ptr, 0x21), right)
            if iszero(staticcall(gas(), 0x02, ptr, 0x41, 0x00, 0x20)) { revert(0, 0) }
            result := mload(0x00)
        }
    }

    /// @dev Shift fn and sn right together until fn's lowest bit is set or fn is zero.
    function _alignRight(uint256 fn, uint256 sn) private pure returns (uint256, uint256) {
        while (fn != 0 && fn & 1 == 0) {
            fn >>= 1;
            sn >>= 1;
        }
        return (fn, sn);
    }

    /// @notice Whether `proof` shows the leaf hash `leaf` at `index` in the tree of `treeSize` leaves with `root`.
    function verifyInclusion(uint256 index, uint256 treeSize, bytes32 leaf, bytes32[] calldata proof, bytes32 root)
        internal
        view
        returns (bool)
    {
        if (index >= treeSize) return false;
        uint256 fn = index;
        uint256 sn = treeSize - 1;
        bytes32 r = leaf;
        for (uint256 i = 0; i < proof.length; ++i) {
            if (sn == 0) return false;
            if (fn & 1 == 1 || fn == sn) {
                r = _node(proof[i], r);
                if (fn & 1 == 0) (fn, sn) = _alignRight(fn, sn);
            } else {
                r = _node(r, proof[i]);
            }
            fn >>= 1;
            sn >>= 1;
        }
        return sn == 0 && r == root;
    }

    /// @notice Whether `proof` shows that the tree (`firstSize`, `firstRoot`) is a prefix of (`secondSize`, `secondRoot`).
    /// @dev Equal sizes need equal roots and an empty proof; an empty first tree is a prefix of every tree.
    function verifyConsistency(
        uint256 firstSize,
        uint256 secondSize,
        bytes32 firstRoot,
        bytes32 secondRoot,
        bytes32[] calldata proof
    ) internal view returns (bool) {
        if (firstSize > secondSize) return false;
        if (firstSize == secondSize) return proof.length == 0 && firstRoot == secondRoot;
        if (firstSize == 0) return proof.length == 0;
        if (proof.length == 0) return false;

        uint256 start = 0;
        bytes32 fr;
        // When the first tree is a complete subtree, its root is the implicit first element of the path.
        if (firstSize & (firstSize - 1) == 0) {
            fr = firstRoot;
        } else {
            fr = proof[0];
            start = 1;
        }
        bytes32 sr = fr;
        uint256 fn = firstSize - 1;
        uint256 sn = secondSize - 1;
        while (fn & 1 == 1) {
            fn >>= 1;
            sn >>= 1;
        }
        for (uint256 i = start; i < proof.length; ++i) {
            if (sn == 0) return false;
            bytes32 c = proof[i];
            if (fn & 1 == 1 || fn == sn) {
                fr = _node(c, fr);
                sr = _node(c, sr);
                if (fn & 1 == 0) (fn, sn) = _alignRight(fn, sn);
            } else {
                sr = _node(sr, c);
            }
            fn >>= 1;
            sn >>= 1;
        }
        return fr == firstRoot && sr == secondRoot && sn == 0;
    }
}
