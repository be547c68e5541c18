"""The reference corpus's shipped part: what the base model writes unaided is generic, never Datanet evidence."""

from __future__ import annotations

import gzip
import random
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from longtail.attribution.spans import (
    REFERENCE_GENERATED,
    IndexedRecord,
    SpanIndex,
    attribute_output,
    build_reference,
    generated_answers,
    package_prose,
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
    # Not an answer's first sentence: the model wrote it without the leading space it has in the output.
    sentences = [s for answer in generated_answers() for s in re.split(r"(?<=\.) ", answer)[1:]
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


def test_package_prose_reads_descriptions_and_each_licence_once(tmp_path):
    licence = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software. " * 2
    readme = "A library that does one thing well. For more information, please refer to the documentation."
    for name in ("alpha-1.0.dist-info", "beta-2.0.dist-info", "longtail-0.1.dist-info"):
        folder = tmp_path / name
        (folder / "licenses").mkdir(parents=True)
        (folder / "licenses" / "LICENSE").write_text(licence)
        (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n\n{readme} ({name})\n")
    (tmp_path / "alpha-1.0.dist-info" / "RECORD").write_text("alpha/__init__.py,sha256=x,1\n" * 10)
    texts = package_prose(tmp_path)
    assert texts == [f"{readme} (alpha-1.0.dist-info)", licence.strip(), f"{readme} (beta-2.0.dist-info)"]


def test_package_prose_reads_descriptions_as_utf8(tmp_path):
    """METADATA carries no charset; its README is UTF-8, and an em dash or an emoji stays one character."""
    folder = tmp_path / "gamma-1.0.dist-info"
    folder.mkdir()
    readme = "🤗 A library for everyone — fast, small, and documented: naïve users welcome, déjà vu avoided."
    (folder / "METADATA").write_bytes(f"Metadata-Version: 2.1\nName: gamma\n\n{readme}\n".encode())
    assert package_prose(tmp_path) == [readme]


def test_every_shipped_answer_file_is_in_the_reference():
    for path in REFERENCE_GENERATED:
        answers = generated_answers(path)
        assert len(answers) >= 500, path
    assert generated_answers() == [a for path in REFERENCE_GENERATED for a in generated_answers(path)]
