"""Adapter credit that knows data: per Datanet, how much better the adapter predicts that Datanet's held-out records.

Scored once per adapter (when it is registered or first served), never per
request: for each Datanet the adapter declares, the same held-out records that
`longtail train` holds out (a seeded shuffle of the record list, the first 5 %;
serving/training.py `prepare_blocks`) are forced through the engine's `score`
API with and without the adapter. The credit of Datanet d is the mean gain in
log-likelihood per token, adapter over base, on d's held-out tokens. It is
recorded with the adapter (a JSON file beside the adapter store) and the
attributor weighs the registry shares by it (node/attributor.py,
docs/attribution.md "Adapter credit").

What it means: the adapter predicts text like Datanet d better than the base
model does, by that many nats per token, on records it did not train on (when
it was trained by `longtail train` with the default seed). What it cannot claim:
that d caused the gain (a neighbouring Datanet teaching the same style earns it
too), that a given answer used d, or anything about records the adapter was
trained on if the trainer used another split (the gain is then optimistic).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

# Same rule as serving/training.py's TrainConfig defaults: the records `longtail train` never trains on.
HELD_OUT_SEED = 0
HELD_OUT_FRACTION = 0.05
MAX_RECORDS = 16  # per Datanet: bounds the one-off cost (16 forwards of at most 96 tokens, twice)
MAX_TOKENS = 96  # per record
CREDIT_VERSION = 1
_ADAPTER_ID = re.compile(r"^0x[0-9a-f]{64}$")

ScoreFn = Callable[[Sequence[int], Sequence[int], "str | None"], Sequence[float]]


class AdapterCreditError(ValueError):
    """A data-credit file is malformed or belongs to another adapter."""


def held_out_records(records: Sequence, datanet_id: str, seed: int = HELD_OUT_SEED,
                     fraction: float = HELD_OUT_FRACTION) -> list:
    """The records `longtail train` holds out of Datanet `datanet_id` (its `prepare_blocks` split)."""
    order = list(range(len(records)))
    random.Random(f"{seed}:{datanet_id}").shuffle(order)
    count = max(1, round(len(records) * fraction))
    return [records[i] for i in order[:count]]


@dataclasses.dataclass(frozen=True)
class DatanetGain:
    """Log-likelihood of one Datanet's held-out tokens under the base model and under the adapter."""

    records: int
    tokens: int
    base_logprob: float
    adapter_logprob: float

    @property
    def gain_per_token(self) -> float:
        return (self.adapter_logprob - self.base_logprob) / self.tokens if self.tokens else 0.0

    @property
    def gain_micro(self) -> int:
        """The gain in micro-nats per token, an integer: the unit the receipt's evidence records."""
        return round(self.gain_per_token * 1_000_000)

    def to_json(self) -> dict:
        return {"records": self.records, "tokens": self.tokens, "baseLogprob": self.base_logprob,
                "adapterLogprob": self.adapter_logprob, "gainMicroNatsPerToken": self.gain_micro}

    @classmethod
    def from_json(cls, data: dict) -> DatanetGain:
        return cls(int(data["records"]), int(data["tokens"]), float(data["baseLogprob"]),
                   float(data["adapterLogprob"]))


@dataclasses.dataclass(frozen=True)
class DataCredit:
    """An adapter's held-out gain per Datanet, scored once and kept with the adapter."""

    adapter_id: str
    gains: dict[str, DatanetGain]

    def gains_micro(self) -> dict[str, int]:
        return {d: g.gain_micro for d, g in self.gains.items()}

    def to_json(self) -> dict:
        return {"version": CREDIT_VERSION, "adapterId": self.adapter_id,
                "heldOut": {"seed": HELD_OUT_SEED, "fraction": HELD_OUT_FRACTION, "maxRecords": MAX_RECORDS,
                            "maxTokens": MAX_TOKENS},
                "datanets": {d: g.to_json() for d, g in sorted(self.gains.items())}}

    @classmethod
    def from_json(cls, data: dict) -> DataCredit:
        try:
            if data["version"] != CREDIT_VERSION:
                raise ValueError(f"version {data['version']}")
            return cls(str(data["adapterId"]).lower(),
                       {str(d).lower(): DatanetGain.from_json(g) for d, g in data["datanets"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise AdapterCreditError(f"malformed data credit: {error}") from error


def _usable(records: Sequence[Sequence[int]], max_records: int, max_tokens: int) -> list[list[int]]:
    return [list(r[:max_tokens]) for r in records if len(r) >= 2][:max_records]


def score_adapter(score: ScoreFn, adapter_id: str, held_out: dict[str, Sequence[Sequence[int]]],
                  max_records: int = MAX_RECORDS, max_tokens: int = MAX_TOKENS) -> DataCredit:
    """Force each Datanet's held-out records (token ids) through `score` with the adapter and with the base.

    `score(prompt_ids, output_ids, adapter_id)` is the engine's scoring API: the log-probability of each output
    token given what precedes it. The record's first token is the prompt, the rest (up to `max_tokens`) is scored.
    """
    gains = {}
    for datanet_id, records in held_out.items():
        usable = _usable(records, max_records, max_tokens)
        base = sum(float(sum(score(ids[:1], ids[1:], None))) for ids in usable)
        adapter = sum(float(sum(score(ids[:1], ids[1:], adapter_id))) for ids in usable)
        gains[datanet_id.lower()] = DatanetGain(len(usable), sum(len(ids) - 1 for ids in usable), base, adapter)
    return DataCredit(adapter_id.lower(), gains)


async def score_adapter_async(score, adapter_id: str, held_out: dict[str, Sequence[Sequence[int]]],
                              max_records: int = MAX_RECORDS, max_tokens: int = MAX_TOKENS) -> DataCredit:
    """`score_adapter` with an async `score` (the node's EngineClient). One forward at a time: submitted all at once
    they would make one long prefill step that answers in flight wait behind."""
    gains = {}
    for datanet_id, records in held_out.items():
        usable = _usable(records, max_records, max_tokens)
        base, adapter = [], []
        for ids in usable:
            base.append(await score(ids[:1], ids[1:], None))
            adapter.append(await score(ids[:1], ids[1:], adapter_id))
        gains[datanet_id.lower()] = DatanetGain(len(usable), sum(len(ids) - 1 for ids in usable),
                                                float(sum(map(sum, base))), float(sum(map(sum, adapter))))
    return DataCredit(adapter_id.lower(), gains)


def held_out_token_ids(folder: Path, datanet_id: str, tokenizer, max_records: int = MAX_RECORDS) -> list[list[int]]:
    """A Datanet folder's held-out records, tokenized like the span index (no special tokens)."""
    from longtail.attribution.datanets import read_records

    records = held_out_records(read_records(Path(folder)), datanet_id.lower())[:max_records]
    return tokenizer([r.text for r in records], add_special_tokens=False)["input_ids"] if records else []


class DataCreditStore:
    """One JSON file per adapter id in a folder (beside the adapter store)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, adapter_id: str) -> Path:
        adapter_id = adapter_id.lower()
        if not _ADAPTER_ID.match(adapter_id):
            raise AdapterCreditError(f"not an adapter id: {adapter_id!r}")
        return self.folder / f"{adapter_id}.json"

    def get(self, adapter_id: str) -> DataCredit | None:
        path = self._path(adapter_id)
        try:
            credit = DataCredit.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as error:
            raise AdapterCreditError(f"cannot read {path}: {error}") from error
        if credit.adapter_id != adapter_id.lower():
            raise AdapterCreditError(f"{path} holds the credit of adapter {credit.adapter_id}")
        return credit

    def put(self, credit: DataCredit) -> Path:
        path = self._path(credit.adapter_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(credit.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path
