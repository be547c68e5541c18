"""`make demo`: the main job on embedded defaults.

For now it loads the embedded base model and answers a question with its chat
template, printing prompt, output and tokens/s. The full local network (chain,
three nodes, paid jobs, audit) grows here as the node and contracts land.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console

console = Console()
DEFAULT_QUESTION = "What is the capital of France? Answer in one sentence."


def generate_answer(question: str, max_new_tokens: int) -> tuple[str, int, float, float]:
    """Greedy answer from the embedded model; returns (text, new tokens, load seconds, decode tokens/s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.base_models import ensure_embedded_model

    started = time.perf_counter()
    folder = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - started
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(prompt_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - started
    new_tokens = output[0, prompt_ids.shape[1]:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return text, len(new_tokens), load_seconds, len(new_tokens) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    console.rule("[bold]Longtail demo: the embedded base model")
    console.print(f"[bold]prompt:[/bold] {args.question}")
    text, count, load_seconds, rate = generate_answer(args.question, args.max_new_tokens)
    console.print(f"[bold]output:[/bold] {text}")
    console.print(f"model load {load_seconds:.1f} s, {count} tokens at {rate:.1f} tokens/s (greedy, CPU fp32)")
    return 0 if text else 1


if __name__ == "__main__":
    sys.exit(main())
