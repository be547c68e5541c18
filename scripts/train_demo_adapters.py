"""Train the demo's four LoRA adapters on the synthetic Datanets and write them to data/adapters/.

Each adapter is trained by the same function as `longtail train` on the embedded
base model, then its figures (train time, held-out loss before and after, a
sample continuation) are written into the table in docs/training.md.

    .venv/bin/python -P -m longtail.scripts.train_demo_adapters [--only legal-r8] [--out-root DIR] [--no-docs]
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import dataclasses
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from longtail.serving.base_models import EMBEDDED_MODEL_NAME, resolve_model
from longtail.serving.training import TrainConfig, TrainingEvent, TrainResult, train_adapter

REPO = Path(__file__).resolve().parents[1]
DATANETS = REPO / "data" / "datanets"
ADAPTERS = REPO / "data" / "adapters"
DOC = REPO / "docs" / "training.md"
BEGIN, END = "<!-- demo-adapters:begin -->", "<!-- demo-adapters:end -->"
TIME_LIMIT_SECONDS = 180


@dataclasses.dataclass(frozen=True)
class DemoAdapter:
    """One shipped adapter: its Datanets with shares and the settings that keep it under 3 minutes."""

    name: str
    datanets: tuple[tuple[str, int], ...]
    config: TrainConfig


# 16 steps of 8 x 128 tokens at a high rate: the templated Datanets are learnt fast, and
# ~4-5 s per step on 2 cores keeps each run well inside 3 minutes (68-86 s measured). Ranks and targets
# differ on purpose so the demo serves a mixed batch; every file stays under 4 MB.
_COMMON = dict(steps=16, lr=5e-3, seq_len=128, batch_size=8, seed=0, checkpoint_every=4)
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
DEMO_ADAPTERS = (
    DemoAdapter("legal-r8", (("legal-clauses", 10_000),), TrainConfig(rank=8, targets=QKVO, **_COMMON)),
    DemoAdapter("recipes-r16", (("kitchen-recipes", 10_000),),
                TrainConfig(rank=16, targets=("q_proj", "v_proj"), **_COMMON)),
    DemoAdapter("clinical-code-r8", (("clinical-notes", 6_000), ("code-reviews", 4_000)),
                TrainConfig(rank=8, targets=("q_proj", "v_proj", "o_proj"), **_COMMON)),
    DemoAdapter("reviews-r4", (("code-reviews", 10_000),), TrainConfig(rank=4, targets=QKVO, **_COMMON)),
)


def train_one(spec: DemoAdapter, base: Path, out_root: Path) -> TrainResult:
    out = out_root / spec.name
    if out.exists():
        shutil.rmtree(out)  # a fresh, reproducible run; no stale checkpoint or files
    started = time.perf_counter()

    def report(event: TrainingEvent) -> None:
        elapsed = time.perf_counter() - started
        if event.phase == "train":
            print(f"  [{elapsed:6.1f} s] step {event.step}/{event.total_steps} loss {event.loss:.3f}", flush=True)
        elif event.phase != "checkpoint":
            print(f"  [{elapsed:6.1f} s] {event.message}", flush=True)

    print(f"== {spec.name}: rank {spec.config.rank} on {', '.join(spec.config.targets)}; "
          f"Datanets {', '.join(f'{n} {s} bps' for n, s in spec.datanets)}", flush=True)
    return train_adapter(
        base,
        [DATANETS / name for name, _ in spec.datanets],
        out,
        spec.config,
        shares=[share for _, share in spec.datanets],
        resume=False,
        on_event=report,
        owner=_devnet_owner(spec.name),
    )


def _devnet_owner(name: str) -> str:
    """The devnet account that registers this adapter: its config declares it (docs/security.md, attack 5)."""
    from longtail.contracts.anvil import DEV_ACCOUNTS
    from longtail.node.devnet import ADAPTER_OWNERS

    return DEV_ACCOUNTS[ADAPTER_OWNERS[name]].address


def _one_line(text: str, limit: int = 90) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def markdown(results: list[tuple[DemoAdapter, TrainResult]]) -> str:
    """The figures table and the before/after samples, as written into docs/training.md."""
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, fp32"
    lines = [
        f"Measured by `scripts/train_demo_adapters.py` on {machine}, {time.strftime('%Y-%m-%d')}.",
        "Train time is the optimizer steps alone; total adds loading, tokenizing, both evaluations,",
        "the sample generations and writing the adapter. Limit per adapter: 180 s total.",
        "",
        "| adapter | Datanets (bps) | rank | targets | steps x tokens | train s | total s "
        "| held-out loss before | after | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec, result in results:
        shares = ", ".join(f"{d.name} {d.share_bps}" for d in result.datanets)
        lines.append(
            f"| {spec.name} | {shares} | {spec.config.rank} | {','.join(spec.config.targets)} "
            f"| {result.steps} x {spec.config.batch_size * spec.config.seq_len} | {result.train_seconds:.0f} "
            f"| {result.total_seconds:.0f} | {result.eval_loss_before:.3f} | {result.eval_loss_after:.3f} "
            f"| {result.adapter_bytes / 1e6:.2f} MB |"
        )
    lines += ["", "Greedy continuations of a held-out record's opening words, before and after training:", ""]
    lines += ["| adapter | prompt | before | after |", "| --- | --- | --- | --- |"]
    for spec, result in results:
        for sample in result.samples:
            lines.append(f"| {spec.name} | {_one_line(sample.prompt)} | {_one_line(sample.before)} "
                         f"| {_one_line(sample.after)} |")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Training\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table}\n{END}", text,
                  flags=re.DOTALL)
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=EMBEDDED_MODEL_NAME, help="base model name or folder")
    parser.add_argument("--only", action="append", help="train only these adapters (repeatable)")
    parser.add_argument("--out-root", type=Path, default=ADAPTERS, help="where the adapter folders go")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/training.md")
    args = parser.parse_args(argv)

    chosen = [spec for spec in DEMO_ADAPTERS if not args.only or spec.name in args.only]
    unknown = set(args.only or ()) - {spec.name for spec in DEMO_ADAPTERS}
    if unknown:
        parser.error(f"unknown adapters {sorted(unknown)}; known: {[spec.name for spec in DEMO_ADAPTERS]}")
    base = resolve_model(args.base)
    results = []
    for spec in chosen:
        result = train_one(spec, base, args.out_root)
        results.append((spec, result))
        print(f"   {spec.name}: held-out loss {result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f}, "
              f"train {result.train_seconds:.0f} s, total {result.total_seconds:.0f} s, "
              f"{result.adapter_bytes / 1e6:.2f} MB, adapterId {result.adapter_id}", flush=True)
    table = markdown(results)
    print(table)
    if not args.no_docs and not args.only:
        write_doc(table)
    slow = [spec.name for spec, result in results if result.total_seconds > TIME_LIMIT_SECONDS]
    if slow:
        print(f"warning: over {TIME_LIMIT_SECONDS} s on this machine: {slow}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
