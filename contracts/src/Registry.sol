// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IOpenToken} from "./lib/IOpenToken.sol";
import {ReentrancyGuard} from "./lib/ReentrancyGuard.sol";

/// @notice The ledger's count of a node's open disputes (documented in AttributionLedger.sol).
interface IDisputeCount {
    function openDisputes(address node) external view returns (uint256);
}

/// @title Registry
/// @notice Who is who in Longtail: nodes (OPEN stake, HTTP endpoint, libp2p peer id, unstake delay),
///         Datanets (owner, records root, record count; the id is derived from those fields) and adapters
///         (owner, base model, Datanet shares in basis points, price per 1k tokens, fetch URI).
///         Only an entry's owner changes it; only the AttributionLedger slashes stake.
contract Registry is ReentrancyGuard {
    struct Node {
        uint128 stake;
        uint128 unbonding;
        uint64 unbondingReadyAt;
        bool registered;
        string endpoint;
        bytes peerId;
    }

    struct Datanet {
        address owner;
        uint64 registeredAt;
        bytes32 recordsRoot;
        uint256 recordCount;
        string name;
    }

    struct Adapter {
        address owner;
        uint16 datanetCount;
        uint64 registeredAt;
        bytes32 baseModelId;
        uint256 pricePer1kTokens;
        string fetchUri;
        bytes32[] datanetIds;
        uint16[] sharesBps;
    }

    uint16 public constant TOTAL_BPS = 10_000;

    IOpenToken public immutable token;
    /// @notice Stake a node needs to count as active (to post checkpoints).
    uint256 public immutable minStake;
    /// @notice Seconds between asking to unstake and being able to withdraw; longer than the dispute window.
    uint256 public immutable unstakeDelay;
    /// @notice The deployer, allowed to name the ledger once.
    address public immutable deployer;
    /// @notice The AttributionLedger, the only account that may slash.
    address public ledger;

    mapping(address node => Node) private _nodes;
    mapping(bytes32 datanetId => Datanet) private _datanets;
    mapping(bytes32 adapterId => Adapter) private _adapters;

    event LedgerSet(address indexed ledger);
    event NodeRegistered(address indexed node, uint256 stake, string endpoint, bytes peerId);
    event NodeUpdated(address indexed node, string endpoint, bytes peerId);
    event StakeAdded(address indexed node, uint256 amount, uint256 stake);
    event UnstakeRequested(address indexed node, uint256 amount, uint256 unbonding, uint256 readyAt);
    event StakeWithdrawn(address indexed node, uint256 amount);
    event NodeSlashed(address indexed node, uint256 amount, address indexed recipient);
    event DatanetRegistered(
        bytes32 indexed datanetId, address indexed owner, string name, bytes32 recordsRoot, uint256 recordCount
    );
    event AdapterRegistered(
        bytes32 indexed adapterId,
        address indexed owner,
        bytes32 baseModelId,
        bytes32[] datanetIds,
        uint16[] sharesBps,
        uint256 pricePer1kTokens,
        string fetchUri
    );
    event AdapterUpdated(bytes32 indexed adapterId, uint256 pricePer1kTokens, string fetchUri);
    event AdapterTransferred(bytes32 indexed adapterId, address indexed from, address indexed to);

    error NotDeployer(address caller);
    error LedgerAlreadySet(address ledger);
    error NotLedger(address caller);
    error ZeroAddress();
    error ZeroAmount();
    error NodeAlreadyRegistered(address node);
    error NodeNotRegistered(address node);
    error StakeBelowMinimum(uint256 stake, uint256 minStake);
    error InsufficientStake(address node, uint256 stake, uint256 requested);
    error NothingUnbonding(address node);
    error UnbondingNotReady(address node, uint256 readyAt, uint256 timestamp);
    error DatanetAlreadyRegistered(bytes32 datanetId);
    error EmptyDatanet(bytes32 datanetId);
    error UnknownDatanet(bytes32 datanetId);
    error AdapterAlreadyRegistered(bytes32 adapterId);
    error UnknownAdapter(bytes32 adapterId);
    error NotAdapterOwner(bytes32 adapterId, address caller, address owner);
    error ZeroAdapterId();
    error SharesLengthMismatch(uint256 datanets, uint256 shares);
    error DatanetsNotSorted(uint256 index);
    error SharesDoNotSum(uint256 sum);
    error AmountTooLarge(uint256 amount);
    error TokenTransferFailed();
    error StakeUnderDispute(address node, uint256 openDisputes);

    /// @param token_ The OPEN token used for stake.
    /// @param minStake_ Stake a node needs to be active.
    /// @param unstakeDelay_ Seconds an unstake waits before withdrawal.
    constructor(IOpenToken token_, uint256 minStake_, uint256 unstakeDelay_) {
        token = token_;
        minStake = minStake_;
        unstakeDelay = unstakeDelay_;
        deployer = msg.sender;
    }

    /// @notice Name the AttributionLedger that may slash; callable once, by the deployer.
    /// @param ledger_ The ledger's address.
    function setLedger(address ledger_) external {
        if (msg.sender != deployer) revert NotDeployer(msg.sender);
        if (ledger != address(0)) revert LedgerAlreadySet(ledger);
        if (ledger_ == address(0)) revert ZeroAddress();
        ledger = ledger_;
        emit LedgerSet(ledger_);
    }

    // ---------------------------------------------------------------- nodes

    /// @notice Register the caller as a node, staking `stake` OPEN (needs an allowance to this contract).
    /// @param stake OPEN to stake, at least `minStake`.
    /// @param endpoint Where clients reach the node's API (a URL).
    /// @param peerId The node's libp2p peer id bytes (derived from the same key as the caller).
    function registerNode(uint256 stake, string calldata endpoint, bytes calldata peerId) external nonReentrant {
        Node storage node = _nodes[msg.sender];
        if (node.registered) revert NodeAlreadyRegistered(msg.sender);
        if (stake < minStake) revert StakeBelowMinimum(stake, minStake);
        if (stake > type(uint128).max) revert AmountTooLarge(stake);
        node.registered = true;
        node.stake = uint128(stake);
        node.endpoint = endpoint;
        node.peerId = peerId;
        emit NodeRegistered(msg.sender, stake, endpoint, peerId);
        _pull(msg.sender, stake);
    }

    /// @notice Change the caller's endpoint and peer id.
    /// @param endpoint The new API URL.
    /// @param peerId The new libp2p peer id bytes.
    function updateNode(string calldata endpoint, bytes calldata peerId) external {
        Node storage node = _registeredNode(msg.sender);
        node.endpoint = endpoint;
        node.peerId = peerId;
        emit NodeUpdated(msg.sender, endpoint, peerId);
    }

    /// @notice Add `amount` OPEN to the caller's stake.
    /// @param amount OPEN to add (needs an allowance).
    function addStake(uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        Node storage node = _registeredNode(msg.sender);
        uint256 stake = node.stake + amount;
        if (stake + node.unbonding > type(uint128).max) revert AmountTooLarge(stake);
        node.stake = uint128(stake);
        emit StakeAdded(msg.sender, amount, stake);
        _pull(msg.sender, amount);
    }

    /// @notice Start unbonding `amount` of the caller's stake; it stays slashable until withdrawn.
    /// @dev A new request restarts the delay for everything unbonding, so stake cannot slip out early.
    /// @param amount OPEN to unbond.
    function requestUnstake(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Node storage node = _registeredNode(msg.sender);
        if (amount > node.stake) revert InsufficientStake(msg.sender, node.stake, amount);
        node.stake -= uint128(amount);
        node.unbonding += uint128(amount);
        uint256 readyAt = block.timestamp + unstakeDelay;
        node.unbondingReadyAt = uint64(readyAt);
        emit UnstakeRequested(msg.sender, amount, node.unbonding, readyAt);
    }

    /// @notice Withdraw the caller's unbonded stake once the unstake delay has passed.
    /// @return amount OPEN sent to the caller.
    function withdrawStake() external nonReentrant returns (uint256 amount) {
        Node storage node = _registeredNode(msg.sender);
        amount = node.unbonding;
        if (amount == 0) revert NothingUnbonding(msg.sender);
        // Stake that a dispute may still slash stays here until every dispute about the node is closed.
        if (ledger != address(0)) {
            uint256 open = IDisputeCount(ledger).openDisputes(msg.sender);
            if (open != 0) revert StakeUnderDispute(msg.sender, open);
        }
        if (block.timestamp < node.unbondingReadyAt) {
            revert UnbondingNotReady(msg.sender, node.unbondingReadyAt, block.timestamp);
        }
        node.unbonding = 0;
        node.unbondingReadyAt = 0;
        emit StakeWithdrawn(msg.sender, amount);
        _push(msg.sender, amount);
    }

    /// @notice Take up to `amount` of a node's stake (active first, then unbonding) and send it to `recipient`.
    /// @dev Ledger only: called when a dispute proves the node hid a receipt.
    /// @param node The node to slash.
    /// @param amount The most to take.
    /// @param recipient Who receives the slashed OPEN (the challenger).
    /// @return slashed What was actually taken (less than `amount` if the stake is smaller).
    function slash(address node, uint256 amount, address recipient) external nonReentrant returns (uint256 slashed) {
        if (msg.sender != ledger) revert NotLedger(msg.sender);
        Node storage entry = _nodes[node];
        uint256 fromStake = amount < entry.stake ? amount : entry.stake;
        uint256 rest = amount - fromStake;
        uint256 fromUnbonding = rest < entry.unbonding ? rest : entry.unbonding;
        entry.stake -= uint128(fromStake);
        entry.unbonding -= uint128(fromUnbonding);
        slashed = fromStake + fromUnbonding;
        emit NodeSlashed(node, slashed, recipient);
        if (slashed > 0) _push(recipient, slashed);
    }

    /// @notice A node's record.
    /// @param node The node's address.
    /// @return The stored record (registered = false for unknown nodes).
    function getNode(address node) external view returns (Node memory) {
        return _nodes[node];
    }

    /// @notice Whether `node` is registered with at least `minStake` active stake.
    /// @param node The node's address.
    /// @return True if it may post checkpoints.
    function isActiveNode(address node) external view returns (bool) {
        Node storage entry = _nodes[node];
        return entry.registered && entry.stake >= minStake;
    }

    // ---------------------------------------------------------------- Datanets

    /// @notice Compute a Datanet's id: keccak256(abi.encode(name, owner, recordsRoot, recordCount)).
    /// @param name_ The Datanet's name.
    /// @param owner The owner's address.
    /// @param recordsRoot RFC 9162 SHA-256 root over its records.
    /// @param recordCount Number of records.
    /// @return The datanetId.
    function datanetIdOf(string calldata name_, address owner, bytes32 recordsRoot, uint256 recordCount)
        public
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(name_, owner, recordsRoot, recordCount));
    }

    /// @notice Register a Datanet owned by the caller; its id is derived from the fields, never chosen.
    /// @param name_ The Datanet's name.
    /// @param recordsRoot RFC 9162 SHA-256 root over its records' canonical JSON.
    /// @param recordCount Number of records (at least one).
    /// @return datanetId The derived id.
    function registerDatanet(string calldata name_, bytes32 recordsRoot, uint256 recordCount)
        external
        returns (bytes32 datanetId)
    {
        datanetId = datanetIdOf(name_, msg.sender, recordsRoot, recordCount);
        if (recordCount == 0) revert EmptyDatanet(datanetId);
        Datanet storage datanet = _datanets[datanetId];
        if (datanet.owner != address(0)) revert DatanetAlreadyRegistered(datanetId);
        datanet.owner = msg.sender;
        datanet.registeredAt = uint64(block.timestamp);
        datanet.recordsRoot = recordsRoot;
        datanet.recordCount = recordCount;
        datanet.name = name_;
        emit DatanetRegistered(datanetId, msg.sender, name_, recordsRoot, recordCount);
    }

    /// @notice A Datanet's record (owner = 0 for unknown ids).
    /// @param datanetId The id.
    /// @return The stored record.
    function getDatanet(bytes32 datanetId) external view returns (Datanet memory) {
        return _datanets[datanetId];
    }

    /// @notice A Datanet's owner, or the zero address if it is not registered.
    /// @param datanetId The id.
    /// @return The owner.
    function datanetOwner(bytes32 datanetId) external view returns (address) {
        return _datanets[datanetId].owner;
    }

    // ---------------------------------------------------------------- adapters

    /// @notice Register an adapter owned by the caller.
    /// @param adapterId keccak256 of the adapter's canonical bytes (content address).
    /// @param baseModelId keccak256 of the base model's safetensors.
    /// @param datanetIds Registered Datanets that trained it, strictly ascending (may be empty).
    /// @param sharesBps Each Datanet's share of the adapter's Datanet pool, summing to 10000 when non-empty.
    /// @param pricePer1kTokens OPEN base units per 1,000 tokens.
    /// @param fetchUri Where peers can fetch the bytes.
    function registerAdapter(
        bytes32 adapterId,
        bytes32 baseModelId,
        bytes32[] calldata datanetIds,
        uint16[] calldata sharesBps,
        uint256 pricePer1kTokens,
        string calldata fetchUri
    ) external {
        if (adapterId == bytes32(0)) revert ZeroAdapterId();
        Adapter storage adapter = _adapters[adapterId];
        if (adapter.owner != address(0)) revert AdapterAlreadyRegistered(adapterId);
        if (datanetIds.length != sharesBps.length) revert SharesLengthMismatch(datanetIds.length, sharesBps.length);
        uint256 sum = 0;
        for (uint256 i = 0; i < datanetIds.length; ++i) {
            if (i > 0 && datanetIds[i] <= datanetIds[i - 1]) revert DatanetsNotSorted(i);
            if (_datanets[datanetIds[i]].owner == address(0)) revert UnknownDatanet(datanetIds[i]);
            sum += sharesBps[i];
        }
        if (datanetIds.length > 0 && sum != TOTAL_BPS) revert SharesDoNotSum(sum);
        adapter.owner = msg.sender;
        adapter.datanetCount = uint16(datanetIds.length);
        adapter.registeredAt = uint64(block.timestamp);
        adapter.baseModelId = baseModelId;
        adapter.pricePer1kTokens = pricePer1kTokens;
        adapter.fetchUri = fetchUri;
        adapter.datanetIds = datanetIds;
        adapter.sharesBps = sharesBps;
        emit AdapterRegistered(adapterId, msg.sender, baseModelId, datanetIds, sharesBps, pricePer1kTokens, fetchUri);
    }

    /// @notice Change an adapter's price and fetch URI (owner only).
    /// @param adapterId The adapter.
    /// @param pricePer1kTokens New price per 1,000 tokens.
    /// @param fetchUri New fetch URI.
    function updateAdapter(bytes32 adapterId, uint256 pricePer1kTokens, string calldata fetchUri) external {
        Adapter storage adapter = _ownedAdapter(adapterId);
        adapter.pricePer1kTokens = pricePer1kTokens;
        adapter.fetchUri = fetchUri;
        emit AdapterUpdated(adapterId, pricePer1kTokens, fetchUri);
    }

    /// @notice Hand an adapter (and its future earnings) to `to` (owner only).
    /// @param adapterId The adapter.
    /// @param to The new owner.
    function transferAdapter(bytes32 adapterId, address to) external {
        if (to == address(0)) revert ZeroAddress();
        Adapter storage adapter = _ownedAdapter(adapterId);
        adapter.owner = to;
        emit AdapterTransferred(adapterId, msg.sender, to);
    }

    /// @notice An adapter's record (owner = 0 for unknown ids).
    /// @param adapterId The adapter.
    /// @return The stored record with its Datanet shares.
    function getAdapter(bytes32 adapterId) external view returns (Adapter memory) {
        return _adapters[adapterId];
    }

    /// @notice What the ledger needs to split an adapter's revenue: its owner and how many Datanets it has.
    /// @param adapterId The adapter.
    /// @return owner The owner (zero if unregistered).
    /// @return datanetCount Number of Datanets with a share.
    function adapterPayee(bytes32 adapterId) external view returns (address owner, uint256 datanetCount) {
        Adapter storage adapter = _adapters[adapterId];
        return (adapter.owner, adapter.datanetCount);
    }

    /// @notice What the ledger needs to split and check an adapter's revenue: its owner and its Datanets.
    /// @param adapterId The adapter.
    /// @return owner The owner (zero if unregistered).
    /// @return datanetIds The Datanets with a share of its Datanet part (ascending; empty if none).
    function adapterPayout(bytes32 adapterId) external view returns (address owner, bytes32[] memory datanetIds) {
        Adapter storage adapter = _adapters[adapterId];
        return (adapter.owner, adapter.datanetIds);
    }

    // ---------------------------------------------------------------- internals

    function _registeredNode(address account) private view returns (Node storage node) {
        node = _nodes[account];
        if (!node.registered) revert NodeNotRegistered(account);
    }

    function _ownedAdapter(bytes32 adapterId) private view returns (Adapter storage adapter) {
        adapter = _adapters[adapterId];
        if (adapter.owner == address(0)) revert UnknownAdapter(adapterId);
        if (adapter.owner != msg.sender) revert NotAdapterOwner(adapterId, msg.sender, adapter.owner);
    }

    function _pull(address from, uint256 amount) private {
        if (!token.transferFrom(from, address(this), amount)) revert TokenTransferFailed();
    }

    function _push(address to, uint256 amount) private {
        if (!token.transfer(to, amount)) revert TokenTransferFailed();
    }
}
