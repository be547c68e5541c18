"""What the reference corpus makes generic: stock sentences that must not pay, and copied English that must.

Span attribution pays a Datanet for a copied span only when the span is evidence (docs/attribution.md, "Which
spans count"). At small Datanets the frequency cap cannot see a stock sentence that sits in two to four records;
then only the reference corpus (and the surprisal floor over what it leaves) stands between that sentence and
payment. This script measures, for one sentence at a time copied whole from a one-record Datanet into an output
between novel words, whether any span of it is kept (would pay):

- the held-out evaluation's stock phrases (scripts/bench_attribution_eval.py); the reference's stock-part prompts
  were written knowing them, so this row is not blind;
- held-out boilerplate: sentences written for this script before the reference gained its stock parts and the
  packages' prose, and used for nothing else: the blind row;
- held-out English: sentences of installed docstrings that no reference holds (packages past the prose cut,
  and no sentence found anywhere in either reference's text), copied whole: these should pay, and the row
  shows what making more text generic costs.

Three rules side by side, built in the same run: the earlier reference (the everyday answers only, no stock
parts, no package descriptions or licences, 8 MB of prose) scored by its bigram model with a 64-nat floor (two
stops ago); this reference, the same bigram model and floor (the last stop); this tree (this reference, its
trigram counts, `MIN_SURPRISAL`). The ratio is this tree's against the first. Writes its table into
docs/attribution.md between `<!-- generic_text:start -->` and `<!-- generic_text:end -->`.

    python -P -m longtail.scripts.bench_generic_text [--no-write] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Written before the reference gained its stock parts; nothing was tuned against it.
HELD_OUT_BOILERPLATE = (
    "We apologize for any inconvenience this may cause.",
    "Feel free to reach out if you have any further questions.",
    "I hope you found this information useful and informative.",
    "This is not financial advice, and you should consult a professional before making any decisions.",
    "Past performance is not indicative of future results.",
    "If you have any questions or concerns, please do not hesitate to contact us.",
    "Thank you for taking the time to read this article.",
    "Please consult a qualified healthcare provider before starting any new treatment.",
    "Overall, it is important to weigh the pros and cons before making a decision.",
    "There are several ways to approach this problem, each with its own advantages.",
    "Here are some tips to help you get started on your journey.",
    "By following these steps, you can improve your chances of success.",
    "This email and any attachments are confidential and intended solely for the addressee.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
    "The views expressed in this article are those of the author and do not necessarily reflect the official policy.",
    "I look forward to hearing from you soon and thank you for your consideration.",
    "In summary, there is no one-size-fits-all answer to this question.",
    "It depends on your specific needs and circumstances.",
    "Let's take a closer look at some of the most common examples.",
    "With that being said, there are a few things to keep in mind.",
    "Terms and conditions apply, and prices are subject to change without notice.",
    "As always, remember to stay safe and have fun.",
    "Ultimately, the choice is yours and depends on your personal preferences.",
    "Of course, this is just one example, and there are many other possibilities.",
    "We hope this guide has been helpful to you.",
    "Sorry, I cannot help with that request.",
    "Click here to learn more about our privacy policy.",
    "This article is for informational purposes only.",
)
ENGLISH_SAMPLE = 1500
FILLER = " zebra walnut harbour quantum."


def held_out_english(exclude: str, count: int, seed: int = 5) -> list[str]:
    """Docstring sentences of the packages at the end of site-packages' path order (u-z, past the prose cut),
    none of them anywhere in `exclude` (the references' text)."""
    from longtail.attribution.spans import package_docstrings

    site = Path(sysconfig.get_paths()["purelib"])
    sentences: set[str] = set()
    for path, docstring in package_docstrings(site):
        if path.relative_to(site).parts[0][0] not in "uvwxyz":
            continue
        for sentence in re.split(r"(?<=\.)\s+", docstring.replace("\n", " ")):
            # Prose, not code: a capital, a full stop, no markup or call syntax.
            if (6 <= len(sentence.split()) <= 40 and sentence[0].isupper() and sentence.endswith(".")
                    and not re.search(r"[`:>=_(){}\[\]]", sentence)):
                sentences.add(sentence)
    ordered = sorted(sentences)
    random.Random(seed).shuffle(ordered)
    return [s for s in ordered if s not in exclude][:count]


def pays(sentence: str, tokenizer, reference, fingerprint: str, rule: dict) -> tuple[bool, int]:
    """Whether a one-record Datanet holding `sentence` is paid when an output copies it whole; its token count.
    `rule`: select_spans' `min_surprisal` and `ngram_order`."""
    from longtail.attribution.spans import IndexedRecord, SpanIndex, select_spans

    ids = tokenizer(" " + sentence, add_special_tokens=False)["input_ids"]
    filler = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    index = SpanIndex.build("0x" + "11" * 32, [IndexedRecord("r", "0x" + "00" * 20, ids)], fingerprint, "")
    kept, _ = select_spans(filler + ids + filler, [index], reference, **rule)
    return bool(kept), len(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--english", type=int, default=ENGLISH_SAMPLE, help="held-out English sentences to copy")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from longtail.attribution.spans import (
        MIN_SURPRISAL,
        NGRAM_ORDER,
        REFERENCE_GENERATED,
        build_reference,
        ensure_reference,
        reference_texts,
        tokenizer_fingerprint,
    )
    from longtail.node.config import longtail_home
    from longtail.scripts.bench_attribution_eval import STOCK_PHRASES
    from longtail.scripts.docs_section import write_section
    from longtail.serving.base_models import ensure_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
    fingerprint = tokenizer_fingerprint(tokenizer)
    earlier = {"prose_bytes": 8_000_000, "generated": REFERENCE_GENERATED[:1], "packages": False}
    began = time.perf_counter()
    bigram = {"min_surprisal": 64.0, "ngram_order": 2}
    with tempfile.TemporaryDirectory() as scratch:
        print("building the baseline reference (earlier parts) ...", file=sys.stderr, flush=True)
        earlier_reference = build_reference(Path(scratch) / "earlier", tokenizer, **earlier)
        print("loading this tree's reference (built once, cached) ...", file=sys.stderr, flush=True)
        home = longtail_home() / "reference" / fingerprint.split(":")[-1]
        reference = ensure_reference(home, tokenizer)
        rules = {  # label: (reference, select_spans' rule)
            "earlier reference, bigram ≥ 64": (earlier_reference, bigram),
            "this reference, bigram ≥ 64": (reference, bigram),
            "this tree": (reference, {"min_surprisal": MIN_SURPRISAL, "ngram_order": NGRAM_ORDER}),
        }
        exclude = "\n".join(reference_texts() + reference_texts(**earlier))
        sets = {
            "evaluation's stock phrases (not blind)": (list(STOCK_PHRASES), "none"),
            "held-out boilerplate": (list(HELD_OUT_BOILERPLATE), "none"),
            "held-out English from docstrings, copied whole": (held_out_english(exclude, args.english), "all"),
        }
        results = {}
        for name, (sentences, should) in sets.items():
            row = {"sentences": len(sentences), "should pay": should}
            for label, (scored_by, rule) in rules.items():
                outcomes = [pays(s, tokenizer, scored_by, fingerprint, rule) for s in sentences]
                row[label] = sum(paid for paid, _ in outcomes)
                if should == "all":
                    row[f"{label} by length"] = {  # bucket of token counts: (paid, sentences)
                        f"{low}-{high if high < 10**9 else ''}": (sum(paid for paid, n in outcomes if low <= n <= high),
                                                                 sum(low <= n <= high for _, n in outcomes))
                        for low, high in ((8, 12), (13, 20), (21, 10**9))}
                else:
                    row[f"{label} paid"] = [s for s, (paid, _) in zip(sentences, outcomes, strict=True) if paid]
            results[name] = row
    seconds = time.perf_counter() - began
    if args.json:
        print(json.dumps(results, indent=1))
    first, last = next(iter(rules)), "this tree"
    lines = [f"`python scripts/bench_generic_text.py` (one-record Datanet per sentence, copied whole between novel "
             f"words; every rule run in the same run; this tree: trigram counts, floor {MIN_SURPRISAL:.0f} nats; "
             f"{seconds:.0f} s).", "",
             "| sentences | count | should pay | " + " | ".join(f"paid, {label}" for label in rules) + " | ratio |",
             "| --- | ---: | --- | " + " | ".join("---:" for _ in rules) + " | ---: |"]
    for name, row in results.items():
        ratio = f"{row[last] / row[first]:.2f}×" if row[first] else "–"
        lines.append(f"| {name} | {row['sentences']} | {row['should pay']} | "
                     + " | ".join(str(row[label]) for label in rules) + f" | {ratio} |")
    english = results["held-out English from docstrings, copied whole"]
    lines.append("")
    lines.append("Held-out English paid by length (tokens), " + " → ".join(rules) + ": " + "; ".join(
        f"{bucket}: " + " → ".join(str(english[f"{label} by length"][bucket][0]) for label in rules) + f" of {total}"
        for bucket, (_, total) in english[f"{first} by length"].items()) + ".")
    for name, row in list(results.items())[:2]:
        if row.get(f"{last} paid"):
            lines.append(f"Still paid in {name.split(' (')[0]}: " + "; ".join(f"`{s}`" for s in row[f"{last} paid"]) + ".")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(REPO / "docs" / "attribution.md", "generic_text", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
