// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @notice A signature is not 65 bytes (r || s || v).
error SignatureLengthInvalid(uint256 length);
/// @notice A signature's s is in the upper half of the curve order (malleable) or v is not 27/28.
error SignatureMalleable(bytes32 s, uint8 v);
/// @notice ecrecover returned the zero address: the signature is not valid for the digest.
error SignatureInvalid(bytes32 digest);

/// @title Signatures
/// @notice Recovers the signer of a 65-byte secp256k1 signature over a digest, rejecting malleable forms.
library Signatures {
    uint256 private constant HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    function recover(bytes32 digest, bytes calldata signature) internal pure returns (address signer) {
        if (signature.length != 65) revert SignatureLengthInvalid(signature.length);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            r := calldataload(signature.offset)
            s := calldataload(add(signature.offset, 0x20))
            v := byte(0, calldataload(add(signature.offset, 0x40)))
        }
        if (uint256(s) > HALF_ORDER || (v != 27 && v != 28)) revert SignatureMalleable(s, v);
        signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert SignatureInvalid(digest);
    }
}
