// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title ReentrancyGuard
/// @notice Blocks re-entry into functions marked `nonReentrant`; the lock lives in transient storage (EIP-1153),
///         so it costs a few hundred gas and resets itself at the end of every transaction.
abstract contract ReentrancyGuard {
    /// @notice A `nonReentrant` function was entered while another one was running.
    error ReentrantCall();

    bool private transient _entered;

    modifier nonReentrant() {
        if (_entered) revert ReentrantCall();
        _entered = true;
        _;
        _entered = false;
    }
}
