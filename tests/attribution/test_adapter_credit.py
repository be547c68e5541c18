"""Data credit: the held-out records are the trainer's, the gain is adapter over base per Datanet, it is stored with
the adapter and weighs the registry shares."""

from __future__ import annotations

import asyncio
import json

import pytest

from longtail.attribution.adapter_credit import (
    AdapterCreditError,
    DataCredit,
    DataCreditStore,
    DatanetGain,
    held_out_records,
    score_adapter,
    score_adapter_async,
)
from longtail.attribution.datanets import Record, build_manifest, write_datanet
from longtail.node.attributor import prior_bps

ADAPTER = "0x" + "ad" * 32
A, B = "0x" + "0a" * 32, "0x" + "0b" * 32


def test_held_out_records_are_the_ones_longtail_train_holds_out(tmp_path):
    from longtail.serving.training import DatanetShare, TextCodec, TrainConfig, prepare_blocks

    records = [Record(f"r{i}", f"record number {i} says word{i} " * 6, "0x" + "01" * 20) for i in range(120)]
    manifest = build_manifest("held", "0x" + "02" * 20, records)
    write_datanet(tmp_path / "d", manifest, records)
    codec = TextCodec(encode=lambda text: [ord(c) for c in text], eos_token_id=0)
    blocks = prepare_blocks(tmp_path / "d", DatanetShare(manifest.datanet_id, "held", 10_000), codec,
                            TrainConfig(seq_len=16))
    held = held_out_records(records, manifest.datanet_id)
    assert len(held) == 6  # 5 % of 120
    assert blocks.sample_prompt == " ".join(held[0].text.split()[:8])
    # The other Datanet's split differs: the shuffle is seeded by the Datanet id.
    assert held_out_records(records, "0x" + "99" * 32) != held


def fake_scorer(quality: dict[str | None, float]):
    """Log-probability per token: -quality[adapter] (the base is `None`)."""
    return lambda prompt, output, adapter: [-quality[adapter]] * len(output)


def test_gain_is_per_datanet_and_can_be_negative():
    held = {A: [[1, 2, 3, 4, 5]] * 3, B: [[7, 8, 9]] * 2}
    calls = []

    def score(prompt, output, adapter):
        calls.append((tuple(prompt), adapter))
        base, tuned = {7: (2.0, 1.5), 1: (2.0, 3.0)}[prompt[0]]  # better on B's text, worse on A's
        return [-(tuned if adapter else base)] * len(output)

    credit = score_adapter(score, ADAPTER, held)
    assert credit.gains[A.lower()].tokens == 12 and credit.gains[A.lower()].gain_per_token == pytest.approx(-1.0)
    assert credit.gains[B.lower()].gain_micro == 500_000
    assert len(calls) == 2 * 5  # each held-out record once with the adapter, once without
    assert asyncio.run(score_adapter_async(_async(score), ADAPTER, held)).gains == credit.gains


def _async(score):
    async def run(prompt, output, adapter):
        await asyncio.sleep(0)
        return score(prompt, output, adapter)
    return run


def test_registry_shares_weighted_by_gain():
    registry = {A: 5000, B: 5000}
    assert prior_bps(registry, None) == registry
    assert prior_bps(registry, {A: 300_000, B: 100_000}) == {A: 7500, B: 2500}
    # A Datanet the adapter predicts no better than the base earns nothing from the prior...
    assert prior_bps(registry, {A: 300_000, B: -50_000}) == {A: 10_000}
    # ...unless no Datanet has a positive gain, or one was not scored: the registry shares stand.
    assert prior_bps(registry, {A: -1, B: -2}) == registry
    assert prior_bps(registry, {A: 300_000}) == registry


def test_store_round_trips_and_refuses_hostile_files(tmp_path):
    store = DataCreditStore(tmp_path)
    credit = DataCredit(ADAPTER, {A: DatanetGain(3, 30, -60.0, -45.0)})
    store.put(credit)
    assert store.get(ADAPTER) == credit and store.get("0x" + "ae" * 32) is None
    with pytest.raises(AdapterCreditError, match="not an adapter id"):
        store.get("../../etc/passwd")
    other = "0x" + "af" * 32
    (tmp_path / f"{other}.json").write_text(json.dumps(credit.to_json()))  # another adapter's credit, renamed
    with pytest.raises(AdapterCreditError, match="holds the credit"):
        store.get(other)
    (tmp_path / f"{other}.json").write_text('{"version": 1, "adapterId": 5}')
    with pytest.raises(AdapterCreditError, match="malformed"):
        store.get(other)


class LetterTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


class FakeEngine:
    """The EngineClient's `score`: the adapter predicts Datanet A's text better than the base, B's worse."""

    def __init__(self) -> None:
        self.calls = 0

    async def score(self, prompt, output, adapter_id, client=None, background=False):
        assert background and client == "data-credit"
        self.calls += 1
        better = prompt[0] == ord("a")
        return [-1.0 if adapter_id and better else -3.0 if adapter_id else -2.0] * len(output)


def test_attributor_scores_data_credit_once_stores_it_and_weighs_the_prior(tmp_path):
    from longtail.node.attributor import Attributor
    from longtail.node.catalog import CatalogEntry, DatanetShare

    ids = {}
    for letter in "ab":
        records = [Record(f"{letter}{i}", f"{letter} record {i} " * 5, "0x" + "01" * 20) for i in range(60)]
        manifest = build_manifest(f"d-{letter}", "0x" + "02" * 20, records)
        write_datanet(tmp_path / letter, manifest, records)
        ids[letter] = manifest.datanet_id
    attributor = Attributor()
    attributor._tokenizer = LetterTokenizer()
    attributor.folders = {ids["a"]: tmp_path / "a", ids["b"]: tmp_path / "b"}
    attributor.credit_store = DataCreditStore(tmp_path / "credit")
    entry = CatalogEntry(name="x", adapter_id=ADAPTER, price_per_1k_tokens=1,
                         datanets=(DatanetShare(ids["a"], "a", 4000), DatanetShare(ids["b"], "b", 6000)))
    before = attributor.attribute(entry, [1, 2, 3])
    assert dict(zip(before.vector.datanet_ids, before.vector.weights_bps, strict=True)) == {ids["a"]: 4000, ids["b"]: 6000}
    assert before.vector.evidence["dataGainMicroNatsPerToken"] is None
    engine = FakeEngine()

    async def serve():
        attributor.start_data_credit(entry, engine)
        attributor.start_data_credit(entry, engine)  # the second is a no-op while the first runs
        await asyncio.gather(*attributor._scoring.values())

    asyncio.run(serve())
    assert engine.calls == 2 * 3 * 2  # 3 held-out records (5 % of 60) per Datanet, with and without the adapter
    credit = attributor.data_credits[ADAPTER]
    assert credit.gains_micro() == {ids["a"]: 1_000_000, ids["b"]: -1_000_000}
    after = attributor.attribute(entry, [1, 2, 3])
    assert dict(zip(after.vector.datanet_ids, after.vector.weights_bps, strict=True)) == {ids["a"]: 10_000}
    assert after.vector.evidence["dataGainMicroNatsPerToken"] == credit.gains_micro()
    # Stored with the adapter: a restarted node reads it instead of scoring again.
    restarted = Attributor()
    restarted.credit_store = DataCreditStore(tmp_path / "credit")
    restarted.folders = dict(attributor.folders)
    engine.calls = 0
    assert asyncio.run(restarted.ensure_data_credit(entry, engine)) == credit and engine.calls == 0


def test_attribution_runs_in_a_worker_thread():
    import threading

    from longtail.attribution.spans import IndexedRecord, SpanIndex
    from longtail.node.attributor import Attributor
    from longtail.node.catalog import CatalogEntry, DatanetShare

    seen = []

    class Spy(Attributor):
        def attribute(self, entry, output_token_ids):
            seen.append(threading.get_ident())
            return super().attribute(entry, output_token_ids)

    spy = Spy({A.lower(): SpanIndex.build(A, [IndexedRecord("r", "0x" + "01" * 20, list(range(1, 30)))])})
    entry = CatalogEntry(name="x", adapter_id=ADAPTER, price_per_1k_tokens=1, datanets=(DatanetShare(A, "a", 10_000),))
    assert spy.searches(entry) and not spy.searches(CatalogEntry(name="base", adapter_id=None, price_per_1k_tokens=1))
    result = asyncio.run(spy.attribute_async(entry, list(range(1, 30))))
    assert seen and seen[0] != threading.get_ident() and result.matched_tokens == 29
