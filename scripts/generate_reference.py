"""Generate the reference corpus's generic answers: what the embedded base model writes unaided.

Span attribution pays a Datanet only for text that is evidence of it (docs/attribution.md). Text the base model
writes with no adapter and no Datanet in sight ("In conclusion, there are many factors to consider", "I hope this
helps", a copyright line) is by definition not such evidence, however many records also hold it. Installed
documentation, the rest of the reference, says little about how an assistant talks; this does.

Two sets of instructions, one shipped file each (a task template times a topic, the lists below, nothing from
any Datanet or evaluation), answered by the embedded SmolLM2-135M-Instruct through our own engine, sampled at
temperature 0.6 with one seed per answer so the answers spread over the phrasings the model uses:

- `answers`: everyday instructions, one answer each, cut at 192 tokens (`generic_answers.txt.gz`);
- `stock-parts`: instructions that ask for a kind of text an answer's stock parts are made of (closings,
  conclusions, disclaimers, notices, transitions), two answers each, cut at 128 tokens
  (`generic_stock_parts.txt.gz`).

Both are shipped gzip-compressed under `attribution/reference/` (one answer per line, newlines inside an
answer escaped as `\\n`), so every node builds the same reference without running a model; this script is how
they were made and how to remake them (31 and 9 minutes on the 2-core CPU).

    python -P -m longtail.scripts.generate_reference                     # the everyday answers
    python -P -m longtail.scripts.generate_reference --set stock-parts   # the stock parts
    python -P -m longtail.scripts.generate_reference --prompts 40 --out /tmp/sample.txt.gz
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import random
import sys
import time
from pathlib import Path

from longtail.attribution.spans import REFERENCE_GENERATED

TASKS = (
    "Explain {topic} to a beginner.",
    "What are the advantages and disadvantages of {topic}?",
    "Write a short essay about {topic}.",
    "Give me some tips about {topic}.",
    "Summarize what people should know about {topic}.",
    "Write a polite email to a colleague about {topic}.",
    "What are common mistakes people make with {topic}?",
    "Answer briefly: why does {topic} matter?",
    "Write a short introduction and conclusion for a report on {topic}.",
    "I have a question about {topic}. Can you help me?",
    "Compare two different approaches to {topic}.",
    "Write a short blog post about {topic}.",
)
TOPICS = (
    "saving money", "learning a new language", "climate change", "healthy eating", "remote work", "time management",
    "public speaking", "renewable energy", "social media", "job interviews", "sleep", "exercise", "online privacy",
    "starting a small business", "electric cars", "reading books", "team meetings", "customer service",
    "writing a resume", "travelling abroad", "gardening", "recycling", "stress at work", "learning to code",
    "artificial intelligence", "cloud computing", "password security", "project management", "renting an apartment",
    "buying a used car", "cooking at home", "volunteering", "studying for exams", "music education",
    "city planning", "public transport", "water conservation", "mental health", "friendship", "parenting",
    "pets", "photography", "personal finance", "investing", "insurance", "taxes", "negotiation", "leadership",
    "feedback at work", "writing clearly", "history of the internet", "space exploration", "vaccines",
    "nutrition labels", "coffee", "tea", "board games", "video games", "online courses", "open source software",
    "databases", "spreadsheets", "email etiquette", "recycling electronics", "solar panels", "home repairs",
    "moving to a new city", "hiking", "running", "cycling", "swimming", "first aid", "fire safety",
    "earthquakes", "weather forecasts", "the scientific method", "statistics", "probability", "democracy",
    "voting", "local news", "libraries", "museums", "art history", "poetry", "film", "theatre",
    "writing a cover letter", "budgeting for a holiday", "customer reviews", "online shopping", "marketing",
    "supply chains", "inflation", "interest rates", "credit cards", "retirement", "working from a cafe",
    "note taking", "keyboard shortcuts", "backups", "software testing", "code reviews", "version control",
    "machine learning", "data visualization", "smartphones", "batteries", "3D printing", "robots",
)
# The stock parts of an answer: openings, closings, caveats, disclaimers, notices, transitions. An answer cut at
# 192 tokens rarely reaches its closing lines, and those are where an assistant's boilerplate sits. These are
# kinds of text, never sentences: which phrasing is generic is the model's to say.
STOCK_PARTS = (
    "Write the last two sentences of a helpful answer about {topic}.",
    "Write a concluding paragraph for an essay about {topic}.",
    "Write a short disclaimer to put under an article about {topic}.",
    "Write a polite closing for an email about {topic}.",
    "Write the opening sentence of an answer to a question about {topic}.",
    "Write a sentence that moves from the benefits of {topic} to its drawbacks.",
    "Write a copyright notice for a book about {topic}.",
    "Write a short note saying that an overview of {topic} is not exhaustive.",
    "Write a customer support reply that apologizes for a problem with {topic}.",
    "Write a footer for a website about {topic}.",
    "Write a sentence that introduces a list of tips about {topic}.",
    "Write a sentence that sums up a long discussion of {topic}.",
)
TEMPERATURE = 0.6


@dataclasses.dataclass(frozen=True)
class PromptSet:
    tasks: tuple[str, ...]
    max_tokens: int
    samples: int  # answers per instruction, one seed each
    out: Path  # the shipped file, where the reference reads it


SETS = {
    "answers": PromptSet(TASKS, 192, 1, REFERENCE_GENERATED[0]),
    "stock-parts": PromptSet(STOCK_PARTS, 128, 2, REFERENCE_GENERATED[1]),
}


def prompts(tasks: tuple[str, ...], count: int, seed: int) -> list[str]:
    """`count` distinct instructions, task x topic, in a seeded order."""
    pairs = list(itertools.product(tasks, TOPICS))
    random.Random(seed).shuffle(pairs)
    return [task.format(topic=topic) for task, topic in pairs[:count]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default="answers", help="which instructions (one shipped file each)")
    parser.add_argument("--prompts", type=int, default=None, help="how many instructions (default: all of the set)")
    parser.add_argument("--batch", type=int, default=64, help="requests in flight at once")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--out", type=Path, default=None, help="default: the set's shipped file")
    args = parser.parse_args()
    chosen = SETS[args.set]
    out = args.out or chosen.out

    import torch
    from transformers import AutoTokenizer

    from longtail.serving.base_models import ensure_embedded_model
    from longtail.serving.engine import Engine
    from longtail.serving.sampling import SamplingParams

    torch.manual_seed(args.seed)
    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, kv_cache_bytes=512 * 2**20)
    instructions = [text for text in prompts(chosen.tasks, args.prompts or len(chosen.tasks) * len(TOPICS), args.seed)
                    for _ in range(chosen.samples)]
    answers: list[str] = []
    began = time.perf_counter()
    generated = 0
    for start in range(0, len(instructions), args.batch):
        chunk = instructions[start:start + args.batch]
        token_prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                       return_dict=False)
                         for text in chunk]
        params = [SamplingParams(max_tokens=chosen.max_tokens, temperature=TEMPERATURE, seed=args.seed * 100_003 + start + i)
                  for i in range(len(chunk))]
        for output in engine.generate(token_prompts, [None] * len(chunk), params):
            if output.finish_reason == "error":
                raise SystemExit(f"generation failed: {output.error}")
            generated += len(output.token_ids)
            text = tokenizer.decode(output.token_ids, skip_special_tokens=True).strip()
            answers.append(text.replace("\\", "\\\\").replace("\n", "\\n"))
        seconds = time.perf_counter() - began
        print(f"{len(answers)}/{len(instructions)} answers, {generated} tokens, {generated / seconds:.0f} tok/s",
              file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same answers give the same bytes, so a remake that changes nothing changes no file.
    with out.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(("\n".join(answers) + "\n").encode())
    print(f"wrote {out} ({len(answers)} answers, {generated} tokens, {time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
