"""Generate the reference corpus's generic answers: what the embedded base model writes unaided.

Span attribution pays a Datanet only for text that is evidence of it (docs/attribution.md). Text the base model
writes with no adapter and no Datanet in sight ("In conclusion, there are many factors to consider", "I hope this
helps", a copyright line) is by definition not such evidence, however many records also hold it. Installed
documentation, the rest of the reference, says little about how an assistant talks; this does.

The prompts are everyday instructions (a task template times a topic, both lists below, nothing from any
Datanet or evaluation), answered by the embedded SmolLM2-135M-Instruct through our own engine, sampled at
temperature 0.6 with one seed per prompt so the answers spread over the phrasings the model uses. The result is
shipped, gzip-compressed, as `attribution/reference/generic_answers.txt.gz` (one answer per line, newlines
inside an answer escaped as `\\n`), so every node builds the same reference without running a model; this
script is how it was made and how to remake it (minutes on the 2-core CPU).

    python -P -m longtail.scripts.generate_reference            # writes the shipped file
    python -P -m longtail.scripts.generate_reference --prompts 40 --out /tmp/sample.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "attribution" / "reference" / "generic_answers.txt.gz"

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
MAX_TOKENS = 192
TEMPERATURE = 0.6


def prompts(count: int, seed: int) -> list[str]:
    """`count` distinct instructions, task x topic, in a seeded order."""
    pairs = list(itertools.product(TASKS, TOPICS))
    random.Random(seed).shuffle(pairs)
    return [task.format(topic=topic) for task, topic in pairs[:count]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=len(TASKS) * len(TOPICS), help="how many instructions")
    parser.add_argument("--batch", type=int, default=64, help="requests in flight at once")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from longtail.serving.base_models import ensure_embedded_model
    from longtail.serving.engine import Engine
    from longtail.serving.sampling import SamplingParams

    torch.manual_seed(args.seed)
    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, kv_cache_bytes=512 * 2**20)
    instructions = prompts(args.prompts, args.seed)
    answers: list[str] = []
    began = time.perf_counter()
    generated = 0
    for start in range(0, len(instructions), args.batch):
        chunk = instructions[start:start + args.batch]
        token_prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                       return_dict=False)
                         for text in chunk]
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=args.seed * 100_003 + start + i)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same answers give the same bytes, so a remake that changes nothing changes no file.
    with args.out.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(("\n".join(answers) + "\n").encode())
    print(f"wrote {args.out} ({len(answers)} answers, {generated} tokens, {time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
