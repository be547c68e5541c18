"""Synthetic Datanets, generated deterministically: four domains, ~1 MB each.

Each domain has its own vocabulary and long fixed phrasings, so a span copied
from one Datanet is found in that Datanet and no other; a few boilerplate
sentences are shared by all domains on purpose, so attribution has common
spans to down-weight. Same seed, same bytes, same datanetIds.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

from eth_account import Account
from eth_utils import keccak

from longtail.attribution.datanets import Record, build_manifest, write_datanet

DEFAULT_OUT = Path("data") / "datanets"
DEFAULT_SEED = 20261128
CONTRIBUTORS_PER_DATANET = 24
TARGET_BYTES = 1_000_000

SHARED_BOILERPLATE = [
    "This material is provided for general information and should be reviewed by a qualified person before use.",
    "All figures in this entry were checked twice by the contributor on the date of submission.",
    "Further questions about this entry can be raised with the community maintainers of the dataset.",
]


def derived_address(label: str) -> str:
    """A stable address for a synthetic actor: the key is keccak(label), never used to sign."""
    return Account.from_key(keccak(text=label)).address


def _pick(rng: random.Random, options: list[str]) -> str:
    return options[rng.randrange(len(options))]


# --- legal clauses -------------------------------------------------------------------------------
LEGAL_PARTIES = ["the Licensor", "the Licensee", "the Supplier", "the Purchaser", "the Landlord", "the Tenant",
                 "the Contractor", "the Employer", "the Guarantor", "the Escrow Agent", "the Disclosing Party",
                 "the Receiving Party"]
LEGAL_SUBJECTS = ["confidential information", "the leased premises", "the deliverables", "the licensed software",
                  "the escrowed funds", "the intellectual property rights", "the purchase price",
                  "the security deposit", "the warranty obligations", "the indemnified losses"]
LEGAL_CLAUSES = [
    "Notwithstanding any provision to the contrary herein, {p1} shall not be liable to {p2} for any indirect, "
    "incidental, consequential or punitive damages arising out of or relating to {s}, whether in contract, tort "
    "or otherwise, even if advised of the possibility thereof.",
    "{p1} hereby covenants that it shall hold {s} in strict confidence and shall not disclose the same to any "
    "third party without the prior written consent of {p2}, such consent not to be unreasonably withheld, "
    "conditioned or delayed.",
    "Upon the occurrence of an Event of Default, {p2} may, by written notice to {p1}, terminate this Agreement "
    "with immediate effect and demand the return of {s} within {n} business days of receipt of such notice.",
    "Each party irrevocably submits to the exclusive jurisdiction of the courts of {venue} in respect of any "
    "dispute concerning {s}, and waives any objection to proceedings in such courts on the grounds of venue.",
    "{p1} shall indemnify, defend and hold harmless {p2} and its officers, directors and employees from and "
    "against all claims, liabilities and expenses, including reasonable attorneys' fees, arising from {s}.",
    "Time shall be of the essence with respect to the obligations of {p1} concerning {s}, and any extension "
    "granted by {p2} shall not operate as a waiver of any subsequent breach of this clause {n}.",
    "No amendment or variation of the provisions governing {s} shall be effective unless it is in writing, "
    "expressly refers to this Agreement and is signed by duly authorised representatives of {p1} and {p2}.",
    "If any provision concerning {s} is held invalid or unenforceable by a court of competent jurisdiction, "
    "the remaining provisions shall continue in full force and effect as between {p1} and {p2}.",
]
LEGAL_VENUES = ["England and Wales", "the State of Delaware", "the Canton of Zurich", "Singapore", "Ontario",
                "the State of New York", "Hong Kong", "New South Wales"]


def legal_record(rng: random.Random) -> str:
    article = rng.randint(1, 40)
    parts = [f"Article {article}.{rng.randint(1, 12)} ({_pick(rng, ['Liability', 'Confidentiality', 'Termination', 'Jurisdiction', 'Indemnity', 'Amendments'])})."]
    for _ in range(rng.randint(2, 4)):
        p1, p2 = rng.sample(LEGAL_PARTIES, 2)
        parts.append(_pick(rng, LEGAL_CLAUSES).format(
            p1=p1, p2=p2, s=_pick(rng, LEGAL_SUBJECTS), n=rng.randint(3, 90), venue=_pick(rng, LEGAL_VENUES)))
    return " ".join(parts)


# --- recipes -------------------------------------------------------------------------------------
RECIPE_DISHES = ["saffron risotto", "braised short ribs", "lemon olive oil cake", "miso glazed aubergine",
                 "wild mushroom ragout", "cardamom rice pudding", "charred leek vinaigrette", "smoked paprika chickpeas",
                 "brown butter gnocchi", "ginger scallion noodles", "fennel and orange salad", "black sesame brittle"]
RECIPE_INGREDIENTS = ["unsalted butter", "shallots", "arborio rice", "dry white vermouth", "coarse sea salt",
                      "toasted cumin seeds", "crème fraîche", "caster sugar", "smoked paprika", "fresh thyme leaves",
                      "light soy sauce", "grated nutmeg", "blanched almonds", "buttermilk", "star anise"]
RECIPE_STEPS = [
    "Melt {g} grams of {i1} in a heavy-bottomed pan over a gentle flame, then add {i2} and sweat them without "
    "colour for {m} minutes, stirring with a wooden spoon so nothing catches on the base.",
    "Whisk {i1} with {i2} in a wide bowl until the mixture turns pale and ribbons off the whisk, roughly {m} "
    "minutes by hand or half that with a stand mixer on medium speed.",
    "Fold in {i1} in three additions, keeping as much air in the batter as you can, and scrape it into a tin "
    "lined with baking parchment before it starts to slacken.",
    "Roast the tray at {t} degrees Celsius for {m} minutes, turning once, until the edges are blistered and "
    "the centres yield to the point of a knife; rest for five minutes before carving.",
    "Deglaze the pan with a splash of {i1}, scraping up the caramelised sediment, and let it bubble until it "
    "has reduced to a syrupy glaze that coats the back of a spoon.",
    "Season generously with {i1} and finish with a spoonful of {i2}, tasting as you go; the sauce should be "
    "glossy, loose enough to pour, and sharp enough to cut through the richness.",
    "Chill the dough, tightly wrapped, for at least {m} minutes so the gluten relaxes and the {i1} firms up, "
    "which keeps the pastry short and stops it shrinking in the oven.",
]


def recipe_record(rng: random.Random) -> str:
    dish = _pick(rng, RECIPE_DISHES)
    parts = [f"Recipe for {dish}, serves {rng.randint(2, 8)}."]
    for _ in range(rng.randint(3, 5)):
        i1, i2 = rng.sample(RECIPE_INGREDIENTS, 2)
        parts.append(_pick(rng, RECIPE_STEPS).format(
            i1=i1, i2=i2, g=rng.randint(10, 250), m=rng.randint(3, 45), t=rng.choice([160, 180, 200, 220])))
    return " ".join(parts)


# --- clinical notes ------------------------------------------------------------------------------
CLINICAL_COMPLAINTS = ["intermittent chest tightness", "productive cough", "bilateral ankle oedema",
                       "episodic palpitations", "right upper quadrant pain", "exertional dyspnoea",
                       "new-onset headache", "dysuria and frequency", "lower back pain radiating to the left leg"]
CLINICAL_FINDINGS = ["a soft systolic murmur at the left sternal edge", "reduced air entry at the right base",
                     "pitting oedema to mid-shin", "tenderness in the right upper quadrant with a positive Murphy sign",
                     "an irregularly irregular pulse of about {hr} beats per minute", "no focal neurological deficit",
                     "suprapubic tenderness without renal angle tenderness"]
CLINICAL_PLANS = ["serial troponins and a repeat electrocardiogram in six hours",
                  "a chest radiograph and sputum culture before starting empirical antibiotics",
                  "an echocardiogram and titration of the loop diuretic against daily weights",
                  "an abdominal ultrasound and liver function tests with a surgical review if febrile",
                  "rate control with a beta blocker and a CHA2DS2-VASc assessment for anticoagulation",
                  "urine microscopy and culture with a three-day course of nitrofurantoin"]
CLINICAL_SENTENCES = [
    "Patient is a {age}-year-old {sex} presenting with {c} of {d} days' duration, worse on exertion and partly "
    "relieved by rest; no recent travel, no known sick contacts.",
    "On examination the patient was alert and orientated, afebrile, with {f}; oxygen saturation {sat} percent on "
    "room air and blood pressure {bp1} over {bp2} millimetres of mercury.",
    "Past medical history is notable for type two diabetes mellitus on metformin and hypertension treated with "
    "an angiotensin receptor blocker; the patient denies tobacco use.",
    "Impression: findings consistent with {c}; differential diagnosis reviewed with the supervising consultant "
    "and documented in the problem list.",
    "Plan: {plan}; safety-netting advice given and the patient verbalised understanding of when to re-present.",
]


def clinical_record(rng: random.Random) -> str:
    parts = [f"Clinical note {rng.randint(1000, 9999)}, ward {rng.choice('ABCDEFG')}{rng.randint(1, 9)}."]
    for template in rng.sample(CLINICAL_SENTENCES, rng.randint(3, 5)):
        parts.append(template.format(
            age=rng.randint(19, 94), sex=rng.choice(["man", "woman"]), c=_pick(rng, CLINICAL_COMPLAINTS),
            d=rng.randint(1, 21), f=_pick(rng, CLINICAL_FINDINGS).format(hr=rng.randint(88, 150)),
            sat=rng.randint(89, 99), bp1=rng.randint(95, 185), bp2=rng.randint(55, 105), plan=_pick(rng, CLINICAL_PLANS)))
    return " ".join(parts)


# --- code review comments ------------------------------------------------------------------------
CODE_FILES = ["scheduler.py", "block_pool.rs", "http_handler.go", "ledger.sol", "cache_test.py", "parser.ts",
              "allocator.cpp", "migrations/0042_add_index.sql", "retry_policy.kt", "kv_store.zig"]
CODE_FUNCTIONS = ["evict_least_recent", "handle_upload", "parse_header", "redeem_voucher", "flush_batch",
                  "compute_checksum", "open_connection", "resolve_conflict", "schedule_next", "release_lock"]
CODE_COMMENTS = [
    "In {file}, `{fn}` holds the mutex across the network call on line {line}; if the peer stalls every other "
    "writer blocks behind it. Could we copy what we need under the lock and release it before awaiting?",
    "Nit: `{fn}` in {file} swallows the error from the retry loop and returns an empty result, so callers cannot "
    "tell a miss from a failure. Please propagate a typed error and add a test for the timeout path.",
    "This allocation inside the hot loop of `{fn}` ({file}, line {line}) shows up at about {pct} percent in the "
    "profile; hoisting the buffer out of the loop and reusing it should remove most of that.",
    "The new branch in `{fn}` is not covered by any test in {file}; a table-driven test with the empty input, a "
    "single element and the boundary at exactly the block size would pin the behaviour down.",
    "I think there is an off-by-one in `{fn}`: when the index equals the length we read one element past the end "
    "of the slice. The fuzzer found it with a {line}-byte input; see the attached reproducer.",
    "Approving with one request: please rename `{fn}` so the name says what it returns, and move the magic number "
    "{line} into a named constant with a comment explaining why it was chosen.",
    "The migration in {file} takes an exclusive lock on a table with millions of rows; on production this will "
    "block writes for minutes. Please build the index concurrently and split the backfill into batches.",
]


def code_review_record(rng: random.Random) -> str:
    parts = [f"Review of pull request #{rng.randint(100, 9999)} ({_pick(rng, CODE_FILES)})."]
    for _ in range(rng.randint(2, 4)):
        parts.append(_pick(rng, CODE_COMMENTS).format(
            file=_pick(rng, CODE_FILES), fn=_pick(rng, CODE_FUNCTIONS), line=rng.randint(12, 980), pct=rng.randint(5, 60)))
    return " ".join(parts)


DOMAINS: dict[str, tuple[str, Callable[[random.Random], str]]] = {
    "legal-clauses": ("law", legal_record),
    "kitchen-recipes": ("cooking", recipe_record),
    "clinical-notes": ("medicine", clinical_record),
    "code-reviews": ("software", code_review_record),
}


def generate_records(name: str, make_text: Callable[[random.Random], str], seed: int,
                     target_bytes: int = TARGET_BYTES) -> list[Record]:
    rng = random.Random(f"{seed}:{name}")
    contributors = [derived_address(f"longtail-demo:{name}:contributor:{i}") for i in range(CONTRIBUTORS_PER_DATANET)]
    records: list[Record] = []
    size = 0
    while size < target_bytes:
        text = make_text(rng)
        if rng.random() < 0.15:
            text = f"{text} {_pick(rng, SHARED_BOILERPLATE)}"
        record = Record(id=f"{name}-{len(records):05d}", text=text, contributor=contributors[rng.randrange(len(contributors))])
        records.append(record)
        size += len(record.canonical_bytes()) + 1
    return records


def generate_all(out_dir: Path, seed: int = DEFAULT_SEED, target_bytes: int = TARGET_BYTES) -> dict[str, str]:
    """Write every domain's Datanet under out_dir; returns name -> datanetId."""
    ids = {}
    for name, (domain, make_text) in DOMAINS.items():
        records = generate_records(name, make_text, seed, target_bytes)
        owner = derived_address(f"longtail-demo:{name}:owner")
        manifest = build_manifest(name, owner, records, domain=domain, seed=seed)
        write_datanet(out_dir / name, manifest, records)
        ids[name] = manifest.datanet_id
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--bytes", type=int, default=TARGET_BYTES, help="approximate size of each Datanet")
    args = parser.parse_args(argv)
    for name, ident in generate_all(args.out, args.seed, args.bytes).items():
        print(f"{name:18s} {ident}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
