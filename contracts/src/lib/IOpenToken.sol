// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title IOpenToken
/// @notice The ERC-20 + EIP-2612 surface the other Longtail contracts use.
interface IOpenToken {
    function transfer(address to, uint256 value) external returns (bool);
    function transferFrom(address from, address to, uint256 value) external returns (bool);
    function allowance(address owner, address spender) external view returns (uint256);
    function balanceOf(address account) external view returns (uint256);
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external;
}
