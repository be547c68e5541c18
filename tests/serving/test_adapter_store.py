"""The content-addressed store: import, aliases, verification on read, removal, peer bundles over real HTTP."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from longtail.serving.adapter_store import (
    BUNDLE_MAGIC,
    AdapterNotFound,
    AdapterStore,
    AliasTaken,
    FetchFailed,
    HttpSource,
    IntegrityError,
    split_bundle,
)
from longtail.serving.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterRejected,
    ModuleShapes,
    adapter_id_of,
    canonical_config_bytes,
    load_adapter,
)

from bundle_server import BundleServer


@pytest.fixture(scope="module")
def shapes(tiny_llama) -> ModuleShapes:
    return ModuleShapes.from_model_dir(tiny_llama.base_dir)


def test_add_is_content_addressed_and_idempotent(tiny_llama, shapes, tmp_path):
    store = AdapterStore(tmp_path)
    source = tiny_llama.adapter_dirs["r8-all"]
    record = store.add(source, shapes, name="support-bot")
    assert record.adapter_id == adapter_id_of(source)
    assert record.path == tmp_path / "adapters" / record.adapter_id
    assert (record.path / WEIGHTS_NAME).read_bytes() == (source / WEIGHTS_NAME).read_bytes()
    config = json.loads((source / CONFIG_NAME).read_text())
    assert (record.path / CONFIG_NAME).read_bytes() == canonical_config_bytes(config)
    assert (record.names, record.max_rank, record.num_modules) == (("support-bot",), 8, 14)
    assert record.targets == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")

    again = store.add(source, shapes)
    assert again == record  # same row, same import time: nothing was rewritten
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith("index")) == [record.adapter_id]
    assert store.resolve("support-bot") == store.resolve(record.adapter_id.upper().replace("0X", "0x"))


def test_aliases_list_show_and_conflicts(tiny_llama, shapes, tmp_path):
    store = AdapterStore(tmp_path)
    first = store.add(tiny_llama.adapter_dirs["r4-attn"], shapes, name="legal")
    second = store.add(tiny_llama.adapter_dirs["r16-mlp-rslora"], shapes, name="medical")
    with pytest.raises(AliasTaken, match="'legal' already names"):
        store.add(tiny_llama.adapter_dirs["r16-mlp-rslora"], shapes, name="legal")
    store.set_alias("legal", second.adapter_id, replace=True)
    assert store.resolve("legal") == second.adapter_id
    assert [r.adapter_id for r in store.list()] == [first.adapter_id, second.adapter_id]
    assert store.get(second.adapter_id).names == ("legal", "medical")
    with pytest.raises(Exception, match="must not look like an adapter id"):
        store.set_alias("0x" + "ab" * 32, first.adapter_id)
    with pytest.raises(AdapterNotFound):
        store.resolve("nobody")
    # A second store object on the same home (another process, the CLI) sees the same index.
    assert AdapterStore(tmp_path).resolve("medical") == second.adapter_id


def test_load_verifies_files_against_the_id(tiny_llama, shapes, tmp_path):
    store = AdapterStore(tmp_path)
    record = store.add(tiny_llama.adapter_dirs["r4-attn"], shapes, name="a")
    loaded = store.load("a", shapes)
    direct = load_adapter(tiny_llama.adapter_dirs["r4-attn"], shapes)
    assert loaded.adapter_id == direct.adapter_id
    for ours, theirs in zip(loaded.modules, direct.modules, strict=True):
        assert torch.equal(ours.lora_a, theirs.lora_a) and ours.scale == theirs.scale
    assert store.verify("a").ok

    # Someone swaps the weights on disk for a different, perfectly valid adapter of the same shape.
    tensors = load_file(record.path / WEIGHTS_NAME)
    tensors = {k: v + 1.0 for k, v in tensors.items()}
    save_file(tensors, record.path / WEIGHTS_NAME)
    result = store.verify("a")
    assert not result.ok and "hash to" in result.reason
    with pytest.raises(IntegrityError, match=record.adapter_id):
        store.load("a", shapes)


def test_remove_deletes_files_and_aliases(tiny_llama, shapes, tmp_path):
    store = AdapterStore(tmp_path)
    record = store.add(tiny_llama.adapter_dirs["r4-attn"], shapes, name="gone")
    store.set_alias("also-gone", "gone")
    removed = store.remove("gone")
    assert removed.names == ("also-gone", "gone")
    assert not record.path.exists()
    assert store.list() == []
    for name in ("gone", "also-gone", record.adapter_id):
        with pytest.raises(AdapterNotFound):
            store.get(name)


def test_rejected_adapter_leaves_nothing_behind(tiny_llama, shapes, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama.adapter_dirs["r4-attn"], bad)
    tensors = load_file(bad / WEIGHTS_NAME)
    next(iter(tensors.values())).fill_(float("nan"))
    save_file(tensors, bad / WEIGHTS_NAME)
    store = AdapterStore(tmp_path / "home")
    with pytest.raises(AdapterRejected, match="non-finite"):
        store.add(bad, shapes, name="bad")
    assert store.list() == [] and "bad" not in store
    assert [p.name for p in store.root.iterdir() if not p.name.startswith("index")] == []


def test_bundle_roundtrip_and_tampering(tiny_llama, shapes, tmp_path):
    sender = AdapterStore(tmp_path / "sender")
    record = sender.add(tiny_llama.adapter_dirs["r64-qko"], shapes)
    bundle = sender.open_bundle(record.adapter_id)
    assert bundle.startswith(BUNDLE_MAGIC)

    receiver = AdapterStore(tmp_path / "receiver")
    got = receiver.import_bundle(bundle, record.adapter_id, shapes, name="from-peer")
    assert got.adapter_id == record.adapter_id and got.names == ("from-peer",)
    assert (got.path / WEIGHTS_NAME).read_bytes() == (record.path / WEIGHTS_NAME).read_bytes()

    flipped = bytearray(bundle)
    flipped[-5] ^= 0x40
    with pytest.raises(IntegrityError):
        AdapterStore(tmp_path / "other").import_bundle(bytes(flipped), record.adapter_id, shapes)
    with pytest.raises(IntegrityError):
        AdapterStore(tmp_path / "other").import_bundle(bundle, "0x" + "00" * 32, shapes)
    with pytest.raises(AdapterRejected, match="not b'LTADPT1"):
        split_bundle(b"GARBAGE!" + bytes(20))
    with pytest.raises(AdapterRejected, match="does not fit"):
        split_bundle(bundle[:20])


def test_bundle_with_honest_id_but_hostile_content_is_rejected(tiny_llama, shapes, tmp_path):
    """The id proves the bytes are the ones asked for, not that they are safe: validation still runs."""
    source = tiny_llama.adapter_dirs["r4-attn"]
    config = canonical_config_bytes(json.loads((source / CONFIG_NAME).read_text()))
    tensors = load_file(source / WEIGHTS_NAME)
    next(iter(tensors.values())).fill_(float("inf"))
    save_file(tensors, tmp_path / "evil.safetensors")
    weights = (tmp_path / "evil.safetensors").read_bytes()
    from longtail.serving.peft_format import adapter_id_from_parts

    honest_id = adapter_id_from_parts(json.loads(config), weights)
    bundle = BUNDLE_MAGIC + len(config).to_bytes(4, "little") + config + weights
    store = AdapterStore(tmp_path / "home")
    with pytest.raises(AdapterRejected, match="non-finite"):
        store.import_bundle(bundle, honest_id, shapes)
    assert honest_id not in store


def test_fetch_from_http_peers(tiny_llama, shapes, tmp_path):
    peer_store = AdapterStore(tmp_path / "peer")
    record = peer_store.add(tiny_llama.adapter_dirs["r16-mlp-rslora"], shapes)
    empty_peer = BundleServer(AdapterStore(tmp_path / "empty-peer"))
    peer = BundleServer(peer_store)
    try:
        local = AdapterStore(tmp_path / "local")
        sources = [HttpSource(empty_peer.url), HttpSource(peer.url + "/{adapter_id}/bundle")]
        got = local.fetch(record.adapter_id, sources, shapes)
        assert got.adapter_id == record.adapter_id
        assert empty_peer.requests and peer.requests == [f"/v1/adapters/{record.adapter_id}/bundle"]
        assert local.verify(record.adapter_id, shapes).ok
        # Held locally now: no further network traffic.
        local.fetch(record.adapter_id, sources, shapes)
        assert len(peer.requests) == 1
        with pytest.raises(FetchFailed, match="HTTP 404"):
            local.fetch("0x" + "11" * 32, sources, shapes)
        with pytest.raises(FetchFailed, match="over the 100-byte limit"):
            HttpSource(peer.url, max_bytes=100).fetch(record.adapter_id)
    finally:
        empty_peer.close()
        peer.close()
