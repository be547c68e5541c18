"""Registry: nodes and stake, Datanets (id derived on chain), adapters with Datanet shares; owners only."""

from __future__ import annotations

from eth_utils import keccak

from longtail.contracts.chain import hex32, send
from longtail.contracts.deployment import OPEN
from longtail.contracts.registry import AdapterRegistration, datanet_id

from contracts_testkit import TEST_PARAMS, reverts

ROOT = "0x" + "ab" * 32
BASE = "0x" + keccak(b"base").hex()


def _datanet(world, name="code", count=10):
    return world.registry.register_datanet(world.datanet_owner, name, ROOT, count)


def _adapter(world, shares, adapter_id=None):
    adapter_id = adapter_id or "0x" + keccak(b"adapter").hex()
    world.registry.register_adapter(world.adapter_owner, AdapterRegistration(
        adapter_id=adapter_id, base_model_id=BASE, datanet_shares=tuple(shares), price_per_1k_tokens=250,
        fetch_uri="longtail://adapter"))
    return adapter_id


def test_register_node_takes_stake_and_records_endpoint(world):
    registry, node = world.registry, world.node
    balance = world.token.balance_of(node.address)
    registry.register_node(node, 1_500 * OPEN, "http://node:8000", b"peer-bytes")
    info = registry.get_node(node.address)
    assert (info.registered, info.stake, info.endpoint, info.peer_id) == (True, 1_500 * OPEN, "http://node:8000", b"peer-bytes")
    assert world.token.balance_of(node.address) == balance - 1_500 * OPEN
    assert world.token.balance_of(registry.address) == 1_500 * OPEN
    assert registry.is_active_node(node.address)
    assert [n.address for n in registry.registered_nodes()] == [node.address]


def test_register_node_reverts(world):
    registry, node = world.registry, world.node
    with reverts("StakeBelowMinimum", stake=1, minStake=TEST_PARAMS.min_stake):
        registry.register_node(node, 1, "e", b"p")
    world.register_node()
    with reverts("NodeAlreadyRegistered", node=node.address):
        registry.register_node(node, TEST_PARAMS.min_stake, "e", b"p")


def test_update_node_and_add_stake(world):
    registry, node = world.registry, world.node
    with reverts("NodeNotRegistered", node=node.address):
        registry.update_node(node, "http://new", b"new")
    with reverts("NodeNotRegistered"):
        registry.add_stake(node, 1)
    world.register_node()
    registry.update_node(node, "http://new", b"new")
    registry.add_stake(node, 5 * OPEN)
    info = registry.get_node(node.address)
    assert (info.endpoint, info.peer_id, info.stake) == ("http://new", b"new", TEST_PARAMS.min_stake + 5 * OPEN)
    with reverts("ZeroAmount"):
        registry.add_stake(node, 0)


def test_unstake_waits_for_the_delay(world):
    registry, node = world.registry, world.node
    with reverts("NodeNotRegistered"):
        registry.request_unstake(node, 1)
    world.register_node(stake=2_000 * OPEN)
    with reverts("ZeroAmount"):
        registry.request_unstake(node, 0)
    with reverts("InsufficientStake", stake=2_000 * OPEN, requested=3_000 * OPEN):
        registry.request_unstake(node, 3_000 * OPEN)
    with reverts("NothingUnbonding", node=node.address):
        registry.withdraw_stake(node)
    registry.request_unstake(node, 1_500 * OPEN)
    info = registry.get_node(node.address)
    assert (info.stake, info.unbonding) == (500 * OPEN, 1_500 * OPEN)
    assert not registry.is_active_node(node.address)  # below min stake now
    with reverts("UnbondingNotReady", readyAt=info.unbonding_ready_at):
        registry.withdraw_stake(node)
    world.anvil.increase_time(TEST_PARAMS.unstake_delay)
    balance = world.token.balance_of(node.address)
    registry.withdraw_stake(node)
    assert world.token.balance_of(node.address) == balance + 1_500 * OPEN
    assert registry.get_node(node.address).unbonding == 0


def test_only_the_ledger_slashes_and_the_ledger_is_set_once(world):
    registry = world.registry
    world.register_node()
    with reverts("NotLedger", caller=world.challenger.address):
        send(world.anvil.w3, world.challenger, registry.contract.functions.slash(world.node.address, 1, world.challenger.address))
    with reverts("LedgerAlreadySet"):
        send(world.anvil.w3, world.deployer, registry.contract.functions.setLedger(world.challenger.address))
    with reverts("NotDeployer", caller=world.challenger.address):
        send(world.anvil.w3, world.challenger, registry.contract.functions.setLedger(world.challenger.address))


def test_datanet_id_is_derived_on_chain_from_its_fields(world):
    from longtail.attribution.datanets import datanet_id as attribution_datanet_id

    expected = datanet_id("code", world.datanet_owner.address, ROOT, 10)
    assert expected == attribution_datanet_id("code", world.datanet_owner.address, bytes.fromhex(ROOT[2:]), 10)
    assert _datanet(world) == expected
    info = world.registry.get_datanet(expected)
    assert (info.owner, info.name, info.records_root, info.record_count) == (world.datanet_owner.address, "code", ROOT, 10)
    assert [d.datanet_id for d in world.registry.registered_datanets()] == [expected]
    with reverts("DatanetAlreadyRegistered", datanetId=bytes.fromhex(expected[2:])):
        _datanet(world)
    with reverts("EmptyDatanet"):
        _datanet(world, "empty", 0)


def test_register_adapter_with_sorted_shares(world):
    first, second = sorted([_datanet(world, "a"), _datanet(world, "b")])
    adapter_id = _adapter(world, [(second, 2_500), (first, 7_500)])  # the wrapper sorts them
    info = world.registry.get_adapter(adapter_id)
    assert info.owner == world.adapter_owner.address
    assert info.datanet_shares == ((first, 7_500), (second, 2_500))
    assert (info.base_model_id, info.price_per_1k_tokens, info.fetch_uri) == (BASE, 250, "longtail://adapter")
    assert [a.adapter_id for a in world.registry.registered_adapters(datanet=first)] == [adapter_id]
    with reverts("AdapterAlreadyRegistered"):
        _adapter(world, [(first, 10_000)], adapter_id)


def test_register_adapter_reverts(world):
    known = _datanet(world)
    unknown = "0x" + "77" * 32
    f = world.registry.contract.functions.registerAdapter
    owner = world.adapter_owner

    def call(adapter_id, ids, shares):
        send(world.anvil.w3, owner, f(bytes.fromhex(adapter_id[2:]), bytes.fromhex(BASE[2:]),
                                      [bytes.fromhex(i[2:]) for i in ids], shares, 1, "uri"))

    adapter = "0x" + "11" * 32
    with reverts("ZeroAdapterId"):
        call("0x" + "00" * 32, [], [])
    with reverts("SharesLengthMismatch", datanets=1, shares=0):
        call(adapter, [known], [])
    with reverts("UnknownDatanet", datanetId=bytes.fromhex(unknown[2:])):
        call(adapter, [unknown], [10_000])
    with reverts("SharesDoNotSum", sum=9_999):
        call(adapter, [known], [9_999])
    other = _datanet(world, "other")
    high, low = max(known, other), min(known, other)
    with reverts("DatanetsNotSorted", index=1):
        call(adapter, [high, low], [5_000, 5_000])
    call(adapter, [], [])  # an adapter without Datanets is allowed
    assert world.registry.get_adapter(adapter).datanet_shares == ()


def test_only_the_owner_updates_or_transfers_an_adapter(world):
    adapter_id = _adapter(world, [])
    registry, owner, stranger = world.registry, world.adapter_owner, world.challenger
    with reverts("NotAdapterOwner", caller=stranger.address, owner=owner.address):
        registry.update_adapter(stranger, adapter_id, 1, "x")
    with reverts("UnknownAdapter"):
        registry.update_adapter(owner, "0x" + "99" * 32, 1, "x")
    registry.update_adapter(owner, adapter_id, 999, "ipfs://new")
    info = registry.get_adapter(adapter_id)
    assert (info.price_per_1k_tokens, info.fetch_uri) == (999, "ipfs://new")
    with reverts("ZeroAddress"):
        registry.transfer_adapter(owner, adapter_id, "0x" + "00" * 20)
    registry.transfer_adapter(owner, adapter_id, stranger.address)
    assert registry.get_adapter(adapter_id).owner == stranger.address
    with reverts("NotAdapterOwner"):
        registry.update_adapter(owner, adapter_id, 1, "x")


def test_unknown_entries_read_as_unregistered(world):
    assert not world.registry.get_node(world.other_node.address).registered
    assert not world.registry.get_datanet("0x" + "12" * 32).registered
    assert not world.registry.get_adapter(hex32(b"\x34" * 32)).registered
