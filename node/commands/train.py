"""`longtail train`: fine-tune a LoRA adapter on one or more Datanets, with a progress bar and resume.

`train` is a plain function with typer options so the top-level CLI can mount it
as `longtail train`; `app` wraps it alone for direct use and tests.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from longtail.node.output import console, fail, print_json, print_table
from longtail.serving.base_models import BaseModelError, resolve_model
from longtail.serving.training import (
    DEFAULT_TARGETS,
    TrainConfig,
    TrainingError,
    TrainingEvent,
    TrainResult,
    train_adapter,
)

_DEFAULTS = TrainConfig()


def train(
    base: str = typer.Option(..., help="base model name in $LONGTAIL_HOME/models, or an HF model folder"),
    datanet: list[Path] = typer.Option(..., help="a Datanet folder (repeat for several)"),
    share: list[int] = typer.Option(None, help="each Datanet's share in basis points, in --datanet order; sum 10000"),
    rank: int = typer.Option(_DEFAULTS.rank, help="LoRA rank"),
    alpha: int = typer.Option(None, help="LoRA alpha (default 2 x rank)"),
    out: Path = typer.Option(..., help="output folder for the PEFT adapter"),
    steps: int = typer.Option(_DEFAULTS.steps, help="optimizer steps"),
    lr: float = typer.Option(_DEFAULTS.lr, help="peak learning rate (warmup, then cosine decay)"),
    seq_len: int = typer.Option(_DEFAULTS.seq_len, help="tokens per packed training block"),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, help="blocks per step"),
    targets: str = typer.Option(",".join(DEFAULT_TARGETS), help="comma-separated modules to adapt"),
    seed: int = typer.Option(_DEFAULTS.seed, help="seed for the LoRA init, the held-out split and batches"),
    checkpoint_every: int = typer.Option(_DEFAULTS.checkpoint_every, help="steps between checkpoints"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue from <out>/checkpoint if present"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts (no progress bar)"),
    owner: str = typer.Option(None, help="address that will register the adapter: declared in its config, so "
                                         "nodes pay only that registration (docs/security.md)"),
) -> None:
    """Train a LoRA adapter on Datanets; its header records the Datanet ids and shares."""
    config = TrainConfig(
        rank=rank,
        alpha=alpha,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        steps=steps,
        lr=lr,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    try:
        base_dir = resolve_model(base)
        if as_json:
            result = train_adapter(base_dir, datanet, out, config, shares=share or None, resume=resume, owner=owner)
        else:
            with _ProgressView(config.steps) as view:
                result = train_adapter(base_dir, datanet, out, config, shares=share or None, resume=resume,
                                       on_event=view.update, owner=owner)
    except (BaseModelError, TrainingError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail(f"interrupted; run the same command again to resume from {out / 'checkpoint'}", code=130)
    if as_json:
        print_json(result.to_json())
    else:
        _print_result(result)


class _ProgressView:
    """A rich progress bar for the training steps, with a status line for the other phases."""

    def __init__(self, total_steps: int):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("preparing", total=total_steps, loss="-")

    def __enter__(self) -> _ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, event: TrainingEvent) -> None:
        if event.phase == "train":
            self.progress.update(self.task, description="training", completed=event.step, loss=f"{event.loss:.3f}")
        elif event.phase == "load" and event.step is not None:
            self.progress.update(self.task, completed=event.step)
            self.progress.console.print(event.message)
        elif event.phase == "checkpoint":
            self.progress.console.print(f"[dim]{event.message}[/dim]")
        else:
            self.progress.update(self.task, description=event.phase)


def _print_result(result: TrainResult) -> None:
    print_table(
        f"adapter written to {result.out_dir}",
        ["field", "value"],
        [
            ("adapter id", result.adapter_id),
            ("base model id", result.base_model_id),
            ("steps", f"{result.steps} (resumed from {result.resumed_from_step})" if result.resumed_from_step
             else result.steps),
            ("held-out loss", f"{result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f}"),
            ("train time", f"{result.train_seconds:.1f} s (total {result.total_seconds:.1f} s)"),
            ("adapter size", f"{result.adapter_bytes / 1e6:.2f} MB"),
        ],
    )
    print_table("Datanets", ["name", "datanetId", "share (bps)", "held-out loss before -> after"],
                [(d.name, d.datanet_id, d.share_bps,
                  "{:.3f} -> {:.3f}".format(*result.eval_loss_by_datanet[d.name])) for d in result.datanets])
    for sample in result.samples:
        if sample.before or sample.after:
            print_table(f"sample: {sample.prompt!r}", ["", "continuation"],
                        [("before", sample.before.strip()), ("after", sample.after.strip())])


app = typer.Typer(help="Fine-tune a LoRA adapter on Datanets.", pretty_exceptions_enable=False)
app.command("train")(train)
