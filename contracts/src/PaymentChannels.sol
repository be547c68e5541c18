// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {EIP712Domain} from "./lib/EIP712Domain.sol";
import {IOpenToken} from "./lib/IOpenToken.sol";
import {ReentrancyGuard} from "./lib/ReentrancyGuard.sol";
import {Signatures} from "./lib/Signatures.sol";

/// @title PaymentChannels
/// @notice One channel per (client, node): the client deposits OPEN, the node redeems the client's EIP-712
///         vouchers `Voucher(bytes32 channelId,uint256 cumulativeAmount)` and is paid only the increase over
///         what it already redeemed (capped at the deposit), as often as it likes. The client takes back the
///         unredeemed rest after a thawing period; the node can still redeem while the channel thaws.
///         Redeemed OPEN waits here as the node's revenue until the AttributionLedger's next checkpoint
///         releases it to be split among node, adapter owners and Datanets.
contract PaymentChannels is EIP712Domain, ReentrancyGuard {
    struct Channel {
        address client;
        uint64 thawEndsAt;
        address node;
        uint128 deposit;
        uint128 redeemed;
    }

    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint256 cumulativeAmount)");

    IOpenToken public immutable token;
    /// @notice Seconds between a client's startWithdraw and finishWithdraw.
    uint256 public immutable thawPeriod;
    /// @notice The deployer, allowed to name the ledger once.
    address public immutable deployer;
    /// @notice The AttributionLedger, the only account that may release revenue.
    address public ledger;

    mapping(bytes32 channelId => Channel) private _channels;
    /// @notice Redeemed OPEN per node that no checkpoint has released yet.
    mapping(address node => uint256) public revenue;

    event LedgerSet(address indexed ledger);
    event Deposited(bytes32 indexed channelId, address indexed client, address indexed node, uint256 amount, uint256 deposit);
    event VoucherRedeemed(
        bytes32 indexed channelId, address indexed node, uint256 cumulativeAmount, uint256 paid, bytes signature
    );
    event WithdrawStarted(bytes32 indexed channelId, address indexed client, uint256 thawEndsAt);
    event WithdrawCancelled(bytes32 indexed channelId, address indexed client);
    event Withdrawn(bytes32 indexed channelId, address indexed client, uint256 refund);
    event RevenueReleased(address indexed node, address indexed ledger, uint256 amount);

    error NotDeployer(address caller);
    error LedgerAlreadySet(address ledger);
    error NotLedger(address caller);
    error ZeroAddress();
    error ZeroAmount();
    error ClientIsNode(address account);
    error UnknownChannel(bytes32 channelId);
    error NotChannelNode(bytes32 channelId, address caller, address node);
    error NotChannelClient(bytes32 channelId, address caller, address client);
    error VoucherSignerMismatch(bytes32 channelId, address signer, address client);
    error VoucherNotIncreasing(bytes32 channelId, uint256 cumulativeAmount, uint256 redeemed);
    error ChannelExhausted(bytes32 channelId, uint256 deposit, uint256 redeemed);
    error WithdrawAlreadyStarted(bytes32 channelId, uint256 thawEndsAt);
    error WithdrawNotStarted(bytes32 channelId);
    error StillThawing(bytes32 channelId, uint256 thawEndsAt, uint256 timestamp);
    error RevenueTooLow(address node, uint256 revenue, uint256 requested);
    error AmountTooLarge(uint256 amount);
    error TokenTransferFailed();

    /// @param token_ The OPEN token.
    /// @param thawPeriod_ Seconds a client waits between startWithdraw and finishWithdraw.
    constructor(IOpenToken token_, uint256 thawPeriod_) EIP712Domain("Longtail", "1") {
        token = token_;
        thawPeriod = thawPeriod_;
        deployer = msg.sender;
    }

    /// @notice Name the AttributionLedger; callable once, by the deployer.
    /// @param ledger_ The ledger's address.
    function setLedger(address ledger_) external {
        if (msg.sender != deployer) revert NotDeployer(msg.sender);
        if (ledger != address(0)) revert LedgerAlreadySet(ledger);
        if (ledger_ == address(0)) revert ZeroAddress();
        ledger = ledger_;
        emit LedgerSet(ledger_);
    }

    /// @notice The id of the channel from `client` to `node`: keccak256(abi.encode(client, node)).
    /// @param client The paying client.
    /// @param node The serving node.
    /// @return The channel id (the voucher domain binds it to this contract and chain).
    function channelIdOf(address client, address node) public pure returns (bytes32) {
        return keccak256(abi.encode(client, node));
    }

    /// @notice Deposit `amount` OPEN into the caller's channel to `node`, opening it if needed.
    /// @param node The node to pay.
    /// @param amount OPEN to add (needs an allowance to this contract).
    /// @return channelId The channel.
    function deposit(address node, uint256 amount) external nonReentrant returns (bytes32 channelId) {
        channelId = _deposit(node, amount);
    }

    /// @notice Deposit with an EIP-2612 permit instead of a prior approve, in one transaction.
    /// @dev A permit already used (e.g. front-run) is fine as long as the allowance is there.
    /// @param node The node to pay.
    /// @param amount OPEN to add.
    /// @param deadline The permit's deadline.
    /// @param v Permit signature v.
    /// @param r Permit signature r.
    /// @param s Permit signature s.
    /// @return channelId The channel.
    function depositWithPermit(address node, uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
        returns (bytes32 channelId)
    {
        try token.permit(msg.sender, address(this), amount, deadline, v, r, s) {}
        catch {
            // Someone may have submitted the permit first; the transferFrom below decides.
        }
        channelId = _deposit(node, amount);
    }

    /// @notice Redeem a client's voucher: pays the node min(cumulativeAmount, deposit) minus what it already redeemed.
    /// @param channelId The channel.
    /// @param cumulativeAmount The voucher's cumulative amount.
    /// @param signature The client's 65-byte EIP-712 signature over the voucher.
    /// @return paid OPEN added to the node's revenue by this call.
    function redeem(bytes32 channelId, uint256 cumulativeAmount, bytes calldata signature)
        external
        returns (uint256 paid)
    {
        Channel storage channel = _channels[channelId];
        address node = channel.node;
        if (node == address(0)) revert UnknownChannel(channelId);
        if (msg.sender != node) revert NotChannelNode(channelId, msg.sender, node);
        uint256 redeemed = channel.redeemed;
        if (cumulativeAmount <= redeemed) revert VoucherNotIncreasing(channelId, cumulativeAmount, redeemed);
        uint256 deposited = channel.deposit;
        if (redeemed == deposited) revert ChannelExhausted(channelId, deposited, redeemed);
        address signer = Signatures.recover(voucherDigest(channelId, cumulativeAmount), signature);
        if (signer != channel.client) revert VoucherSignerMismatch(channelId, signer, channel.client);

        uint256 newRedeemed = cumulativeAmount < deposited ? cumulativeAmount : deposited;
        paid = newRedeemed - redeemed;
        channel.redeemed = uint128(newRedeemed);
        revenue[node] += paid;
        emit VoucherRedeemed(channelId, node, cumulativeAmount, paid, signature);
    }

    /// @notice Start the thawing period after which the client can take back the unredeemed deposit.
    /// @param channelId The caller's channel.
    /// @return thawEndsAt Unix time from which finishWithdraw works.
    function startWithdraw(bytes32 channelId) external returns (uint256 thawEndsAt) {
        Channel storage channel = _clientChannel(channelId);
        if (channel.thawEndsAt != 0) revert WithdrawAlreadyStarted(channelId, channel.thawEndsAt);
        thawEndsAt = block.timestamp + thawPeriod;
        channel.thawEndsAt = uint64(thawEndsAt);
        emit WithdrawStarted(channelId, msg.sender, thawEndsAt);
    }

    /// @notice Stop a thawing withdrawal; the channel is fully usable again.
    /// @param channelId The caller's channel.
    function cancelWithdraw(bytes32 channelId) external {
        Channel storage channel = _clientChannel(channelId);
        if (channel.thawEndsAt == 0) revert WithdrawNotStarted(channelId);
        channel.thawEndsAt = 0;
        emit WithdrawCancelled(channelId, msg.sender);
    }

    /// @notice After the thaw, send the client everything not redeemed; the channel stays open for new deposits.
    /// @param channelId The caller's channel.
    /// @return refund OPEN returned to the client.
    function finishWithdraw(bytes32 channelId) external nonReentrant returns (uint256 refund) {
        Channel storage channel = _clientChannel(channelId);
        uint256 thawEndsAt = channel.thawEndsAt;
        if (thawEndsAt == 0) revert WithdrawNotStarted(channelId);
        if (block.timestamp < thawEndsAt) revert StillThawing(channelId, thawEndsAt, block.timestamp);
        refund = channel.deposit - channel.redeemed;
        // The deposit shrinks to what was redeemed, so vouchers already paid can never pay twice.
        channel.deposit = channel.redeemed;
        channel.thawEndsAt = 0;
        emit Withdrawn(channelId, msg.sender, refund);
        if (refund > 0) _push(msg.sender, refund);
    }

    /// @notice Send `amount` of a node's redeemed revenue to the ledger (ledger only, at a checkpoint).
    /// @param node The node whose revenue is split.
    /// @param amount OPEN to release.
    function releaseRevenue(address node, uint256 amount) external nonReentrant {
        if (msg.sender != ledger) revert NotLedger(msg.sender);
        uint256 available = revenue[node];
        if (amount > available) revert RevenueTooLow(node, available, amount);
        revenue[node] = available - amount;
        emit RevenueReleased(node, msg.sender, amount);
        _push(msg.sender, amount);
    }

    /// @notice The EIP-712 digest a client signs for a voucher on this contract and chain.
    /// @param channelId The channel.
    /// @param cumulativeAmount Everything paid on the channel so far.
    /// @return The digest.
    function voucherDigest(bytes32 channelId, uint256 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, cumulativeAmount)));
    }

    /// @notice A channel's state (node = 0 for unknown channels).
    /// @param channelId The channel.
    /// @return The stored channel.
    function getChannel(bytes32 channelId) external view returns (Channel memory) {
        return _channels[channelId];
    }

    function _deposit(address node, uint256 amount) private returns (bytes32 channelId) {
        if (node == address(0)) revert ZeroAddress();
        if (node == msg.sender) revert ClientIsNode(node);
        if (amount == 0) revert ZeroAmount();
        channelId = channelIdOf(msg.sender, node);
        Channel storage channel = _channels[channelId];
        if (channel.node == address(0)) {
            channel.client = msg.sender;
            channel.node = node;
        }
        uint256 total = channel.deposit + amount;
        if (total > type(uint128).max) revert AmountTooLarge(total);
        channel.deposit = uint128(total);
        emit Deposited(channelId, msg.sender, node, amount, total);
        if (!token.transferFrom(msg.sender, address(this), amount)) revert TokenTransferFailed();
    }

    function _clientChannel(bytes32 channelId) private view returns (Channel storage channel) {
        channel = _channels[channelId];
        if (channel.node == address(0)) revert UnknownChannel(channelId);
        if (msg.sender != channel.client) revert NotChannelClient(channelId, msg.sender, channel.client);
    }

    function _push(address to, uint256 amount) private {
        if (!token.transfer(to, amount)) revert TokenTransferFailed();
    }
}
