// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {EIP712Domain} from "./lib/EIP712Domain.sol";
import {IOpenToken} from "./lib/IOpenToken.sol";
import {MerkleLog} from "./lib/MerkleLog.sol";
import {ReentrancyGuard} from "./lib/ReentrancyGuard.sol";
import {Signatures} from "./lib/Signatures.sol";

/// @notice The Registry functions the ledger calls (documented in Registry.sol).
interface IRegistryView {
    function isActiveNode(address node) external view returns (bool);
    function adapterPayee(bytes32 adapterId) external view returns (address owner, uint256 datanetCount);
    function datanetOwner(bytes32 datanetId) external view returns (address);
    function unstakeDelay() external view returns (uint256);
    function slash(address node, uint256 amount, address recipient) external returns (uint256);
    function adapterPayout(bytes32 adapterId) external view returns (address owner, bytes32[] memory datanetIds);
}

/// @notice The PaymentChannels function the ledger calls (documented in PaymentChannels.sol).
interface IRevenueSource {
    function releaseRevenue(address node, uint256 amount) external;
}

/// @title AttributionLedger
/// @notice Checkpoints of each node's receipt log (RFC 9162 tree size and root, each consistent with the
///         last), the split of the node's redeemed revenue among node, adapter owners and Datanet pools
///         (pull payments), Merkle distributions from Datanet pools to contributors, and disputes that slash
///         a node whose signed receipt is not provable in its checkpointed log.
/// @dev Split of one checkpoint's declared revenue r_a per adapter a (a = 0 is the bare base model):
///      the adapter owner gets floor(r_a * adapterShareBps / 10000); floor(r_a * datanetShareBps / 10000) is
///      the adapter's Datanet part, paid to its Datanets as the checkpoint declares (their sum must equal the
///      total of those parts exactly), or to the adapter owner when the adapter has no Datanets; the node
///      keeps the rest, rounding dust included. Base-model revenue is the node's alone.
contract AttributionLedger is EIP712Domain, ReentrancyGuard {
    /// @notice The receipt a node signs for every request (DESIGN.md, fixed).
    struct Receipt {
        address node;
        uint64 seq;
        bytes32 requestId;
        address client;
        bytes32 channelId;
        bytes32 baseModelId;
        bytes32 adapterId;
        bytes32 promptHash;
        bytes32 outputHash;
        uint32 promptTokens;
        uint32 outputTokens;
        uint256 price;
        bytes32 attributionHash;
        uint64 timestamp;
    }

    /// @notice One payee line of a checkpoint: an adapter's gross revenue or a Datanet's payout.
    struct Allocation {
        bytes32 id;
        uint256 amount;
    }

    struct Checkpoint {
        uint64 treeSize;
        uint64 epoch;
        uint64 postedAt;
        bytes32 rootHash;
    }

    struct Distribution {
        bytes32 datanetId;
        bytes32 root;
        uint64 leafCount;
        uint128 total;
        uint128 claimed;
    }

    enum DisputeStatus {
        None,
        Open,
        Answered,
        Slashed
    }

    struct Dispute {
        address node;
        uint64 seq;
        address challenger;
        uint64 deadline;
        uint64 treeSize;
        DisputeStatus status;
        uint128 bond;
        bytes32 rootHash;
        bytes32 leafHash;
    }

    bytes32 public constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(address node,uint64 seq,bytes32 requestId,address client,bytes32 channelId,bytes32 baseModelId,"
        "bytes32 adapterId,bytes32 promptHash,bytes32 outputHash,uint32 promptTokens,uint32 outputTokens,"
        "uint256 price,bytes32 attributionHash,uint64 timestamp)"
    );
    uint256 public constant TOTAL_BPS = 10_000;
    /// @notice The challenger's reward out of a slash, in basis points; the rest is burned. A node that
    ///         "proves" its own throwaway receipts from a second account gets back at most this much, so slashing
    ///         itself never beats the unstake delay and always costs it (docs/security.md).
    uint256 public constant CHALLENGER_REWARD_BPS = 1_000;

    IOpenToken public immutable token;
    IRegistryView public immutable registry;
    IRevenueSource public immutable channels;
    /// @notice Adapter owner's share of the adapter's revenue, in basis points.
    uint256 public immutable adapterShareBps;
    /// @notice Datanets' share of an adapter's revenue, in basis points.
    uint256 public immutable datanetShareBps;
    /// @notice Seconds a node has to answer a dispute with an inclusion proof.
    uint256 public immutable disputeWindow;
    /// @notice OPEN a challenger locks to open a dispute; the node gets it if it answers.
    uint256 public immutable disputeBond;
    /// @notice OPEN taken from a node's stake when a dispute proves a hidden receipt.
    uint256 public immutable slashAmount;

    mapping(address node => Checkpoint) private _checkpoints;
    /// @notice OPEN each account can claim (nodes, adapter owners, challengers).
    mapping(address account => uint256) public claimable;
    /// @notice OPEN in each Datanet's pool, not yet published in a distribution.
    mapping(bytes32 datanetId => uint256) public datanetPool;
    /// @notice Number of distributions published so far (ids are 0..count-1).
    uint256 public distributionCount;
    mapping(uint256 distributionId => Distribution) private _distributions;
    mapping(uint256 distributionId => mapping(uint256 word => uint256)) private _claimedBits;
    /// @notice Number of disputes opened so far (ids are 0..count-1).
    uint256 public disputeCount;
    mapping(uint256 disputeId => Dispute) private _disputes;
    /// @notice Receipt leaf hashes that already cost their node a slash (evidence is used once).
    mapping(bytes32 leafHash => bool) public penalized;
    /// @notice Disputes about each node not yet answered or resolved; the Registry keeps the stake while any is open.
    mapping(address node => uint256) public openDisputes;
    /// @notice Slashed OPEN that no one can ever claim (held here, moved by no function).
    uint256 public burned;

    event CheckpointPosted(address indexed node, uint64 indexed epoch, uint64 treeSize, bytes32 rootHash, uint256 revenue);
    event NodePaid(address indexed node, uint64 indexed epoch, uint256 amount);
    event AdapterPaid(
        address indexed node, uint64 indexed epoch, bytes32 indexed adapterId, address owner, uint256 revenue, uint256 amount
    );
    event DatanetPaid(address indexed node, uint64 indexed epoch, bytes32 indexed datanetId, uint256 amount);
    event Claimed(address indexed account, uint256 amount);
    event DistributionPublished(
        uint256 indexed distributionId, bytes32 indexed datanetId, bytes32 root, uint64 leafCount, uint256 total
    );
    event DistributionClaimed(uint256 indexed distributionId, uint256 indexed leafIndex, address indexed account, uint256 amount);
    event DisputeOpened(
        uint256 indexed disputeId,
        address indexed node,
        address indexed challenger,
        uint64 seq,
        bytes32 leafHash,
        uint64 treeSize,
        bytes32 rootHash,
        uint256 deadline
    );
    event DisputeAnswered(uint256 indexed disputeId, address indexed node, uint256 bond);
    event DisputeResolved(uint256 indexed disputeId, address indexed node, address indexed challenger, uint256 slashed, uint256 bond);
    event MismatchProven(
        address indexed node, address indexed challenger, uint64 seq, bytes32 receiptLeaf, bytes32 committedLeaf, uint256 slashed
    );

    error InvalidSplit(uint256 adapterShareBps, uint256 datanetShareBps);
    error DisputeWindowTooLong(uint256 disputeWindow, uint256 unstakeDelay);
    error NodeNotActive(address node);
    error TreeShrank(address node, uint256 previousSize, uint256 treeSize);
    error InconsistentCheckpoint(address node, uint256 previousSize, uint256 treeSize, bytes32 previousRoot, bytes32 rootHash);
    error UnknownAdapter(bytes32 adapterId);
    error UnknownDatanet(bytes32 datanetId);
    error DatanetTotalMismatch(uint256 expected, uint256 declared);
    error DatanetsNotSorted(uint256 index);
    error DatanetOverpaid(bytes32 datanetId, uint256 cap, uint256 amount);
    error RevenueWithoutReceipts(uint256 previousSize, uint256 treeSize, uint256 adapterLines);
    error NothingToClaim(address account);
    error NotDatanetOwner(bytes32 datanetId, address caller, address owner);
    error EmptyDistribution();
    error PoolTooLow(bytes32 datanetId, uint256 pool, uint256 requested);
    error UnknownDistribution(uint256 distributionId);
    error AlreadyClaimed(uint256 distributionId, uint256 leafIndex);
    error InvalidDistributionProof(uint256 distributionId, uint256 leafIndex);
    error DistributionOverdrawn(uint256 distributionId, uint256 remaining, uint256 amount);
    error ReceiptSignerMismatch(address signer, address node);
    error ReceiptNotCovered(address node, uint256 seq, uint256 treeSize);
    error AlreadyPenalized(bytes32 leafHash);
    error UnknownDispute(uint256 disputeId);
    error DisputeNotOpen(uint256 disputeId, DisputeStatus status);
    error DisputeWindowClosed(uint256 disputeId, uint256 deadline, uint256 timestamp);
    error DisputeWindowOpen(uint256 disputeId, uint256 deadline, uint256 timestamp);
    error InvalidInclusionProof(address node, uint256 seq, uint256 treeSize);
    error LeafMatches(bytes32 leafHash);
    error TokenTransferFailed();

    /// @param token_ The OPEN token.
    /// @param registry_ The Registry (node activity, adapter and Datanet owners, slashing).
    /// @param channels_ The PaymentChannels contract holding redeemed revenue.
    /// @param adapterShareBps_ Adapter owner's share of adapter revenue (bps).
    /// @param datanetShareBps_ Datanets' share of adapter revenue (bps).
    /// @param disputeWindow_ Seconds a node has to answer a dispute; shorter than the registry's unstake delay.
    /// @param disputeBond_ OPEN a challenger locks per dispute.
    /// @param slashAmount_ OPEN slashed per proven hidden receipt.
    constructor(
        IOpenToken token_,
        IRegistryView registry_,
        IRevenueSource channels_,
        uint256 adapterShareBps_,
        uint256 datanetShareBps_,
        uint256 disputeWindow_,
        uint256 disputeBond_,
        uint256 slashAmount_
    ) EIP712Domain("Longtail", "1") {
        if (adapterShareBps_ + datanetShareBps_ > TOTAL_BPS) revert InvalidSplit(adapterShareBps_, datanetShareBps_);
        uint256 unstakeDelay = registry_.unstakeDelay();
        // A node must not be able to unstake between hiding a receipt and the end of a dispute about it.
        if (disputeWindow_ >= unstakeDelay) revert DisputeWindowTooLong(disputeWindow_, unstakeDelay);
        token = token_;
        registry = registry_;
        channels = channels_;
        adapterShareBps = adapterShareBps_;
        datanetShareBps = datanetShareBps_;
        disputeWindow = disputeWindow_;
        disputeBond = disputeBond_;
        slashAmount = slashAmount_;
    }

    // ---------------------------------------------------------------- checkpoints and the split

    /// @notice Post the caller's log checkpoint and split `sum(adapters.amount)` of its redeemed revenue.
    /// @param treeSize Number of receipts in the log.
    /// @param rootHash RFC 9162 root of the log at `treeSize`.
    /// @param consistencyProof RFC 9162 consistency proof from the previous checkpoint (empty for the first).
    /// @param adapters Gross revenue per adapter this epoch (id 0 = base model without adapter).
    /// @param datanets Payout per Datanet; must sum to the adapters' Datanet parts.
    /// @return epoch The new checkpoint's epoch number (1 for the first).
    function postCheckpoint(
        uint64 treeSize,
        bytes32 rootHash,
        bytes32[] calldata consistencyProof,
        Allocation[] calldata adapters,
        Allocation[] calldata datanets
    ) external nonReentrant returns (uint64 epoch) {
        if (!registry.isActiveNode(msg.sender)) revert NodeNotActive(msg.sender);
        Checkpoint storage checkpoint = _checkpoints[msg.sender];
        uint64 previousSize = checkpoint.treeSize;
        bytes32 previousRoot = checkpoint.rootHash;
        if (treeSize < previousSize) revert TreeShrank(msg.sender, previousSize, treeSize);
        if (!MerkleLog.verifyConsistency(previousSize, treeSize, previousRoot, rootHash, consistencyProof)) {
            revert InconsistentCheckpoint(msg.sender, previousSize, treeSize, previousRoot, rootHash);
        }
        epoch = checkpoint.epoch + 1;
        checkpoint.treeSize = treeSize;
        checkpoint.epoch = epoch;
        checkpoint.postedAt = uint64(block.timestamp);
        checkpoint.rootHash = rootHash;
        // Each adapter line pays for at least one receipt, and those receipts must be in the log this checkpoint
        // adds, so every receipt that earns revenue becomes disputable.
        if (adapters.length > treeSize - previousSize) {
            revert RevenueWithoutReceipts(previousSize, treeSize, adapters.length);
        }
        uint256 revenue = _split(epoch, adapters, datanets);
        emit CheckpointPosted(msg.sender, epoch, treeSize, rootHash, revenue);
        if (revenue > 0) channels.releaseRevenue(msg.sender, revenue);
    }

    /// @dev Credits adapter owners, Datanet pools and the node (msg.sender); returns the revenue split.
    function _split(uint64 epoch, Allocation[] calldata adapters, Allocation[] calldata datanets)
        private
        returns (uint256 revenue)
    {
        (uint256 adapterRevenue, uint256 paidOut, uint256 datanetPart, uint256[] memory parts, bytes32[][] memory ids) =
            _payAdapters(epoch, adapters);
        _payDatanets(epoch, parts, ids, datanets, datanetPart);
        revenue = adapterRevenue;
        uint256 nodeAmount = revenue - paidOut - datanetPart;
        if (nodeAmount > 0) claimable[msg.sender] += nodeAmount;
        emit NodePaid(msg.sender, epoch, nodeAmount);
    }

    function _payAdapters(uint64 epoch, Allocation[] calldata adapters)
        private
        returns (uint256 revenue, uint256 paidOut, uint256 datanetPart, uint256[] memory parts, bytes32[][] memory ids)
    {
        parts = new uint256[](adapters.length);
        ids = new bytes32[][](adapters.length);
        for (uint256 i = 0; i < adapters.length; ++i) {
            bytes32 adapterId = adapters[i].id;
            uint256 amount = adapters[i].amount;
            revenue += amount;
            if (adapterId == bytes32(0)) continue; // base model: all of it is the node's
            (address owner, bytes32[] memory datanetIds) = registry.adapterPayout(adapterId);
            if (owner == address(0)) revert UnknownAdapter(adapterId);
            uint256 ownerAmount = amount * adapterShareBps / TOTAL_BPS;
            uint256 datanetAmount = amount * datanetShareBps / TOTAL_BPS;
            if (datanetIds.length == 0) {
                ownerAmount += datanetAmount;
            } else {
                datanetPart += datanetAmount;
                parts[i] = datanetAmount;
                ids[i] = datanetIds;
            }
            paidOut += ownerAmount;
            if (ownerAmount > 0) claimable[owner] += ownerAmount;
            emit AdapterPaid(msg.sender, epoch, adapterId, owner, amount, ownerAmount);
        }
    }

    /// @dev A Datanet is paid at most the Datanet parts of the checkpoint's adapters registered with it, so a node
    ///      cannot move an adapter's Datanet part to a Datanet of its own; ids strictly ascend (no line twice). A
    ///      Datanet named in an adapter's registration is registered (the Registry checked it then).
    function _payDatanets(
        uint64 epoch,
        uint256[] memory parts,
        bytes32[][] memory ids,
        Allocation[] calldata datanets,
        uint256 expected
    ) private {
        uint256 declared = 0;
        for (uint256 i = 0; i < datanets.length; ++i) {
            bytes32 datanetId = datanets[i].id;
            uint256 amount = datanets[i].amount;
            if (i > 0 && datanetId <= datanets[i - 1].id) revert DatanetsNotSorted(i);
            uint256 cap = 0;
            for (uint256 j = 0; j < parts.length; ++j) {
                bytes32[] memory trained = ids[j];
                for (uint256 k = 0; k < trained.length; ++k) {
                    if (trained[k] == datanetId) {
                        cap += parts[j];
                        break;
                    }
                }
            }
            if (cap == 0 || amount > cap) revert DatanetOverpaid(datanetId, cap, amount);
            declared += amount;
            datanetPool[datanetId] += amount;
            emit DatanetPaid(msg.sender, epoch, datanetId, amount);
        }
        if (declared != expected) revert DatanetTotalMismatch(expected, declared);
    }

    /// @notice A node's latest checkpoint (all zero before the first).
    /// @param node The node.
    /// @return The checkpoint.
    function latestCheckpoint(address node) external view returns (Checkpoint memory) {
        return _checkpoints[node];
    }

    /// @notice Send the caller everything it can claim.
    /// @return amount OPEN sent.
    function claim() external nonReentrant returns (uint256 amount) {
        amount = claimable[msg.sender];
        if (amount == 0) revert NothingToClaim(msg.sender);
        claimable[msg.sender] = 0;
        emit Claimed(msg.sender, amount);
        _push(msg.sender, amount);
    }

    // ---------------------------------------------------------------- Datanet distributions

    /// @notice Publish a distribution of `total` from a Datanet's pool to its contributors (Datanet owner only).
    /// @dev Leaves are RFC 9162 leaves over abi.encode(address account, uint256 amount), in the owner's order.
    /// @param datanetId The Datanet.
    /// @param root RFC 9162 root over the distribution's leaves.
    /// @param leafCount Number of leaves.
    /// @param total OPEN taken from the pool; claims can never exceed it.
    /// @return distributionId The new distribution's id.
    function publishDistribution(bytes32 datanetId, bytes32 root, uint64 leafCount, uint256 total)
        external
        returns (uint256 distributionId)
    {
        address owner = registry.datanetOwner(datanetId);
        if (owner == address(0)) revert UnknownDatanet(datanetId);
        if (msg.sender != owner) revert NotDatanetOwner(datanetId, msg.sender, owner);
        if (leafCount == 0 || total == 0) revert EmptyDistribution();
        uint256 pool = datanetPool[datanetId];
        if (total > pool) revert PoolTooLow(datanetId, pool, total);
        datanetPool[datanetId] = pool - total;
        distributionId = distributionCount++;
        _distributions[distributionId] = Distribution({
            datanetId: datanetId, root: root, leafCount: leafCount, total: uint128(total), claimed: 0
        });
        emit DistributionPublished(distributionId, datanetId, root, leafCount, total);
    }

    /// @notice Pay `account` its entry of a distribution; anyone may submit it, the OPEN goes to `account`.
    /// @param distributionId The distribution.
    /// @param leafIndex The entry's position.
    /// @param account The contributor.
    /// @param amount The entry's amount.
    /// @param proof RFC 9162 inclusion proof of the entry.
    function claimDistribution(
        uint256 distributionId,
        uint256 leafIndex,
        address account,
        uint256 amount,
        bytes32[] calldata proof
    ) external nonReentrant {
        Distribution storage distribution = _distributions[distributionId];
        if (distribution.leafCount == 0) revert UnknownDistribution(distributionId);
        uint256 word = leafIndex >> 8;
        uint256 bit = 1 << (leafIndex & 0xff);
        if (_claimedBits[distributionId][word] & bit != 0) revert AlreadyClaimed(distributionId, leafIndex);
        bytes32 leaf = MerkleLog.leafHashOf(abi.encode(account, amount));
        if (!MerkleLog.verifyInclusion(leafIndex, distribution.leafCount, leaf, proof, distribution.root)) {
            revert InvalidDistributionProof(distributionId, leafIndex);
        }
        uint256 remaining = distribution.total - distribution.claimed;
        if (amount > remaining) revert DistributionOverdrawn(distributionId, remaining, amount);
        _claimedBits[distributionId][word] |= bit;
        distribution.claimed += uint128(amount);
        emit DistributionClaimed(distributionId, leafIndex, account, amount);
        _push(account, amount);
    }

    /// @notice A distribution's record (leafCount = 0 for unknown ids).
    /// @param distributionId The distribution.
    /// @return The stored record.
    function getDistribution(uint256 distributionId) external view returns (Distribution memory) {
        return _distributions[distributionId];
    }

    /// @notice Whether a distribution entry was already paid.
    /// @param distributionId The distribution.
    /// @param leafIndex The entry's position.
    /// @return True if claimed.
    function isDistributionClaimed(uint256 distributionId, uint256 leafIndex) external view returns (bool) {
        return _claimedBits[distributionId][leafIndex >> 8] & (1 << (leafIndex & 0xff)) != 0;
    }

    // ---------------------------------------------------------------- receipts and disputes

    /// @notice The EIP-712 digest of a receipt on this ledger and chain.
    /// @param receipt The receipt.
    /// @return The digest the node signs.
    function receiptDigest(Receipt calldata receipt) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(RECEIPT_TYPEHASH, receipt)));
    }

    /// @notice The receipt's leaf hash in its node's log: SHA-256(0x00 || receiptDigest).
    /// @param receipt The receipt.
    /// @return The leaf hash.
    function receiptLeafHash(Receipt calldata receipt) public view returns (bytes32) {
        return MerkleLog.leafHash(receiptDigest(receipt));
    }

    /// @notice Challenge a node to prove that its signed receipt is in its checkpointed log.
    /// @dev Locks `disputeBond` from the caller (needs an allowance). The node (or anyone) answers with an
    ///      inclusion proof within `disputeWindow`; otherwise resolveDispute slashes the node.
    /// @param receipt A receipt the node signed, with seq below its latest checkpoint's tree size.
    /// @param signature The node's 65-byte signature over the receipt.
    /// @return disputeId The new dispute.
    function openDispute(Receipt calldata receipt, bytes calldata signature)
        external
        nonReentrant
        returns (uint256 disputeId)
    {
        (bytes32 leaf, Checkpoint storage checkpoint) = _coveredReceipt(receipt, signature);
        if (penalized[leaf]) revert AlreadyPenalized(leaf);
        uint256 deadline = block.timestamp + disputeWindow;
        disputeId = disputeCount++;
        ++openDisputes[receipt.node];
        _disputes[disputeId] = Dispute({
            node: receipt.node,
            seq: receipt.seq,
            challenger: msg.sender,
            deadline: uint64(deadline),
            treeSize: checkpoint.treeSize,
            status: DisputeStatus.Open,
            bond: uint128(disputeBond),
            rootHash: checkpoint.rootHash,
            leafHash: leaf
        });
        emit DisputeOpened(
            disputeId, receipt.node, msg.sender, receipt.seq, leaf, checkpoint.treeSize, checkpoint.rootHash, deadline
        );
        if (disputeBond > 0 && !token.transferFrom(msg.sender, address(this), disputeBond)) {
            revert TokenTransferFailed();
        }
    }

    /// @notice Answer a dispute with the inclusion proof of the receipt in the checkpoint it was raised against.
    /// @dev The challenger's bond becomes claimable by the node, which paid to answer.
    /// @param disputeId The dispute.
    /// @param inclusionProof RFC 9162 inclusion proof of the receipt's leaf at its seq.
    function answerDispute(uint256 disputeId, bytes32[] calldata inclusionProof) external {
        Dispute storage dispute = _openDispute(disputeId);
        if (block.timestamp > dispute.deadline) revert DisputeWindowClosed(disputeId, dispute.deadline, block.timestamp);
        if (!MerkleLog.verifyInclusion(dispute.seq, dispute.treeSize, dispute.leafHash, inclusionProof, dispute.rootHash)) {
            revert InvalidInclusionProof(dispute.node, dispute.seq, dispute.treeSize);
        }
        dispute.status = DisputeStatus.Answered;
        --openDisputes[dispute.node];
        uint256 bond = dispute.bond;
        if (bond > 0) claimable[dispute.node] += bond;
        emit DisputeAnswered(disputeId, dispute.node, bond);
    }

    /// @notice After the window, slash the node of an unanswered dispute; the challenger gets its bond back and
    ///         CHALLENGER_REWARD_BPS of the slash (claimable), the rest is burned.
    /// @param disputeId The dispute.
    /// @return slashed OPEN taken from the node's stake.
    function resolveDispute(uint256 disputeId) external nonReentrant returns (uint256 slashed) {
        Dispute storage dispute = _openDispute(disputeId);
        if (block.timestamp <= dispute.deadline) revert DisputeWindowOpen(disputeId, dispute.deadline, block.timestamp);
        dispute.status = DisputeStatus.Slashed;
        --openDisputes[dispute.node];
        address challenger = dispute.challenger;
        uint256 bond = dispute.bond;
        // The only external call goes to our own Registry, which moves stake to this contract; the dispute is
        // already closed above, and nonReentrant covers the rest.
        slashed = _penalize(dispute.node, dispute.leafHash);
        claimable[challenger] += _reward(slashed) + bond;
        emit DisputeResolved(disputeId, dispute.node, challenger, slashed, bond);
    }

    /// @notice Prove at once that a signed receipt is not in the node's log: the checkpointed tree holds a
    ///         different leaf at the receipt's seq. Slashes the node; the caller gets CHALLENGER_REWARD_BPS of the
    ///         slash, the rest is burned.
    /// @param receipt A receipt the node signed, with seq below its latest checkpoint's tree size.
    /// @param signature The node's signature over the receipt.
    /// @param committedLeaf The leaf hash the checkpointed tree holds at position `receipt.seq`.
    /// @param inclusionProof RFC 9162 inclusion proof of `committedLeaf` at `receipt.seq`.
    /// @return slashed OPEN taken from the node's stake.
    function proveMismatch(
        Receipt calldata receipt,
        bytes calldata signature,
        bytes32 committedLeaf,
        bytes32[] calldata inclusionProof
    ) external nonReentrant returns (uint256 slashed) {
        (bytes32 leaf, Checkpoint storage checkpoint) = _coveredReceipt(receipt, signature);
        if (leaf == committedLeaf) revert LeafMatches(leaf);
        if (penalized[leaf]) revert AlreadyPenalized(leaf);
        if (!MerkleLog.verifyInclusion(receipt.seq, checkpoint.treeSize, committedLeaf, inclusionProof, checkpoint.rootHash)) {
            revert InvalidInclusionProof(receipt.node, receipt.seq, checkpoint.treeSize);
        }
        slashed = _penalize(receipt.node, leaf);
        claimable[msg.sender] += _reward(slashed);
        emit MismatchProven(receipt.node, msg.sender, receipt.seq, leaf, committedLeaf, slashed);
    }

    /// @notice A dispute's record.
    /// @param disputeId The dispute.
    /// @return The stored record (status None for unknown ids).
    function getDispute(uint256 disputeId) external view returns (Dispute memory) {
        return _disputes[disputeId];
    }

    function _coveredReceipt(Receipt calldata receipt, bytes calldata signature)
        private
        view
        returns (bytes32 leaf, Checkpoint storage checkpoint)
    {
        bytes32 digest = receiptDigest(receipt);
        address signer = Signatures.recover(digest, signature);
        if (signer != receipt.node) revert ReceiptSignerMismatch(signer, receipt.node);
        checkpoint = _checkpoints[receipt.node];
        if (receipt.seq >= checkpoint.treeSize) revert ReceiptNotCovered(receipt.node, receipt.seq, checkpoint.treeSize);
        leaf = MerkleLog.leafHash(digest);
    }

    function _openDispute(uint256 disputeId) private view returns (Dispute storage dispute) {
        dispute = _disputes[disputeId];
        if (dispute.status == DisputeStatus.None) revert UnknownDispute(disputeId);
        if (dispute.status != DisputeStatus.Open) revert DisputeNotOpen(disputeId, dispute.status);
    }

    /// @dev Slash once per receipt: later disputes about the same leaf only return their bonds.
    function _penalize(address node, bytes32 leaf) private returns (uint256 slashed) {
        if (penalized[leaf]) return 0;
        penalized[leaf] = true;
        slashed = registry.slash(node, slashAmount, address(this));
    }

    /// @dev The challenger's share of a slash; the rest is burned (stays in this contract, claimable by no one).
    function _reward(uint256 slashed) private returns (uint256 reward) {
        reward = slashed * CHALLENGER_REWARD_BPS / TOTAL_BPS;
        burned += slashed - reward;
    }

    function _push(address to, uint256 amount) private {
        if (!token.transfer(to, amount)) revert TokenTransferFailed();
    }
}
