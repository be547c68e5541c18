// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {EIP712Domain} from "./lib/EIP712Domain.sol";

/// @title OpenToken (OPEN)
/// @notice The ERC-20 that pays for Longtail inference, with EIP-2612 permit so a client can approve and
///         deposit in one transaction. Minting exists for devnets only: the admin names minters and can
///         close minting for good, after which the supply is fixed.
contract OpenToken is EIP712Domain {
    string public constant name = "Open";
    string public constant symbol = "OPEN";
    uint8 public constant decimals = 18;

    bytes32 public constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");

    /// @notice The account that names minters and may close minting.
    address public immutable admin;
    /// @notice Whether `mint` still works; false forever once closed.
    bool public mintingOpen;

    uint256 public totalSupply;
    mapping(address account => uint256) public balanceOf;
    mapping(address owner => mapping(address spender => uint256)) public allowance;
    mapping(address owner => uint256) public nonces;
    mapping(address account => bool) public isMinter;

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event MinterSet(address indexed account, bool allowed);
    event MintingClosed(address indexed by);

    error ERC20InsufficientBalance(address sender, uint256 balance, uint256 needed);
    error ERC20InsufficientAllowance(address spender, uint256 allowance, uint256 needed);
    error ERC20InvalidReceiver(address receiver);
    error ERC20InvalidSender(address sender);
    error ERC20InvalidSpender(address spender);
    error PermitExpired(uint256 deadline, uint256 timestamp);
    error PermitInvalidSigner(address signer, address owner);
    error NotAdmin(address caller);
    error NotMinter(address caller);
    error MintingIsClosed();

    /// @param admin_ Names minters and may close minting; it is a minter from the start when minting is open.
    /// @param mintingOpen_ True on devnets (faucet by mint); false deploys a token whose supply is the
    ///        `initialSupply` forever.
    /// @param initialSupply Minted to `admin_` at deployment.
    constructor(address admin_, bool mintingOpen_, uint256 initialSupply) EIP712Domain(name, "1") {
        admin = admin_;
        mintingOpen = mintingOpen_;
        if (mintingOpen_) {
            isMinter[admin_] = true;
            emit MinterSet(admin_, true);
        }
        if (initialSupply > 0) _update(address(0), admin_, initialSupply);
    }

    /// @notice Move `value` of the caller's tokens to `to`.
    /// @param to The receiver (not the zero address).
    /// @param value Amount in base units.
    /// @return Always true; failures revert.
    function transfer(address to, uint256 value) external returns (bool) {
        _transfer(msg.sender, to, value);
        return true;
    }

    /// @notice Move `value` from `from` to `to` using the caller's allowance (an allowance of 2^256-1 never shrinks).
    /// @param from The owner of the tokens.
    /// @param to The receiver.
    /// @param value Amount in base units.
    /// @return Always true; failures revert.
    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 current = allowance[from][msg.sender];
        if (current != type(uint256).max) {
            if (current < value) revert ERC20InsufficientAllowance(msg.sender, current, value);
            unchecked {
                _approve(from, msg.sender, current - value);
            }
        }
        _transfer(from, to, value);
        return true;
    }

    /// @notice Let `spender` move up to `value` of the caller's tokens.
    /// @param spender The account allowed to spend.
    /// @param value The new allowance (replaces the old one).
    /// @return Always true.
    function approve(address spender, uint256 value) external returns (bool) {
        _approve(msg.sender, spender, value);
        return true;
    }

    /// @notice EIP-2612: set an allowance from the owner's off-chain signature.
    /// @param owner The token owner who signed.
    /// @param spender The account allowed to spend.
    /// @param value The allowance.
    /// @param deadline Unix time after which the signature is void.
    /// @param v Signature recovery id.
    /// @param r Signature r.
    /// @param s Signature s.
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
    {
        if (block.timestamp > deadline) revert PermitExpired(deadline, block.timestamp);
        bytes32 structHash = keccak256(abi.encode(PERMIT_TYPEHASH, owner, spender, value, nonces[owner]++, deadline));
        address signer = ecrecover(_hashTypedData(structHash), v, r, s);
        if (signer == address(0) || signer != owner) revert PermitInvalidSigner(signer, owner);
        _approve(owner, spender, value);
    }

    /// @notice Devnet faucet: create `value` new tokens for `to`.
    /// @param to The receiver.
    /// @param value Amount in base units.
    function mint(address to, uint256 value) external {
        if (!mintingOpen) revert MintingIsClosed();
        if (!isMinter[msg.sender]) revert NotMinter(msg.sender);
        if (to == address(0)) revert ERC20InvalidReceiver(address(0));
        _update(address(0), to, value);
    }

    /// @notice Allow or forbid `account` to mint (admin only).
    /// @param account The minter.
    /// @param allowed Whether it may mint.
    function setMinter(address account, bool allowed) external {
        if (msg.sender != admin) revert NotAdmin(msg.sender);
        isMinter[account] = allowed;
        emit MinterSet(account, allowed);
    }

    /// @notice Close minting forever (admin only); the supply is fixed from here on.
    function closeMinting() external {
        if (msg.sender != admin) revert NotAdmin(msg.sender);
        if (!mintingOpen) revert MintingIsClosed();
        mintingOpen = false;
        emit MintingClosed(msg.sender);
    }

    function _transfer(address from, address to, uint256 value) private {
        if (from == address(0)) revert ERC20InvalidSender(address(0));
        if (to == address(0)) revert ERC20InvalidReceiver(address(0));
        _update(from, to, value);
    }

    /// @dev Every balance change, mint included, flows through here so Transfer events rebuild all balances.
    function _update(address from, address to, uint256 value) private {
        if (from == address(0)) {
            totalSupply += value;
        } else {
            uint256 balance = balanceOf[from];
            if (balance < value) revert ERC20InsufficientBalance(from, balance, value);
            unchecked {
                balanceOf[from] = balance - value;
            }
        }
        unchecked {
            // Cannot overflow: the sum of balances is totalSupply, which is checked above.
            balanceOf[to] += value;
        }
        emit Transfer(from, to, value);
    }

    function _approve(address owner, address spender, uint256 value) private {
        if (spender == address(0)) revert ERC20InvalidSpender(address(0));
        allowance[owner][spender] = value;
        emit Approval(owner, spender, value);
    }
}
