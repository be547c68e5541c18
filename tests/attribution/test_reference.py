"""The reference corpus's shipped part: what the base model writes unaided is generic, never Datanet evidence."""

from __future__ import annotations

import gzip
import random
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from longtail.attribution.spans import (
    IndexedRecord,
    SpanIndex,
    attribute_output,
    build_reference,
    generated_answers,
    reference_texts,
    tokenizer_fingerprint,
)
from longtail.serving.base_models import ensure_embedded_model

DATANET = "0x" + "0d" * 32


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def test_answers_decode_with_their_newlines_and_backslashes(tmp_path):
    answers = generated_answers()
    assert len(answers) >= 500
    assert any("\n" in a for a in answers)
    assert not any("\\n" in a and "\n" not in a for a in answers[:50])  # escapes are undone
    path = tmp_path / "answers.txt.gz"
    path.write_bytes(gzip.compress(b"one\\ntwo\nback\\\\slash\\\\n\n"))
    assert generated_answers(path) == ["one\ntwo", "back\\slash\\n"]


def test_the_reference_holds_every_answer():
    texts = reference_texts(source_bytes=0, prose_bytes=0)
    assert texts[:len(generated_answers())] == generated_answers()


def test_a_sentence_the_base_model_wrote_earns_a_datanet_nothing(tokenizer, tmp_path):
    reference = build_reference(tmp_path / "reference", tokenizer, source_bytes=0, prose_bytes=0)
    sentences = [s for answer in generated_answers() for s in re.split(r"(?<=\.) ", answer)
                 if 14 <= len(s.split()) <= 30 and "\n" not in s]
    generic = random.Random(1).choice(sentences)
    rng = random.Random(2)
    vocabulary = [t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 6]
    specific = " ".join(rng.choice(vocabulary) for _ in range(20)) + "."
    record = tokenizer(f" {generic} {specific}", add_special_tokens=False)["input_ids"]
    index = SpanIndex.build(DATANET, [IndexedRecord("r0", "0x" + "11" * 20, record)], tokenizer_fingerprint(tokenizer))
    filler = tokenizer(" Some words of my own come first here.", add_special_tokens=False)["input_ids"]
    output = filler + record
    result = attribute_output(output, [index], reference=reference)
    credited = np.flatnonzero(result.credited)
    generic_tokens = len(tokenizer(f" {generic}", add_special_tokens=False)["input_ids"])
    # The specific sentence is credited; nothing of the base model's own sentence is.
    assert credited.size > 0
    assert credited.min() >= len(filler) + generic_tokens - 1
