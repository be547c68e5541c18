"""LoRA fine-tuning of a base model on Datanets: the engine behind `longtail train`.

One plain torch loop over PEFT: records are tokenized and packed into fixed-length
blocks, a slice of each Datanet's records is held out for evaluation, and every
`checkpoint_every` steps the adapter, the optimizer and the RNG are written to
`<out>/checkpoint/` so an interrupted run resumes exactly where it stopped.

The finished adapter is an ordinary PEFT folder whose safetensors header carries
which Datanets trained it, with what shares, on which base model. Those bytes are
what adapterId hashes, so the provenance is bound to the id.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from longtail.attribution.datanets import DatanetError, load_manifest, read_records

TOTAL_BPS = 10_000
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
SUMMARY_FILE = "longtail.json"
CHECKPOINT_DIR = "checkpoint"
META_DATANETS = "longtail.datanets"
META_BASE_MODEL = "longtail.base_model_id"
META_TRAINING = "longtail.training"
DEFAULT_TARGETS = ("q_proj", "v_proj")


class TrainingError(RuntimeError):
    """Training cannot start or continue: bad inputs, too little data, an unreadable checkpoint."""


class ShareError(TrainingError, ValueError):
    """Datanet shares are not one positive share per Datanet summing to 10000 basis points."""


class ResumeMismatch(TrainingError):
    """The checkpoint in the output folder was made with different settings than this run."""

    def __init__(self, checkpoint: Path, differences: dict[str, tuple[object, object]]):
        self.checkpoint = checkpoint
        self.differences = differences
        detail = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in differences.items())
        super().__init__(f"{checkpoint} was made with other settings ({detail}); rerun with --no-resume to start over")


class MetadataError(ValueError):
    """An adapter's safetensors header lacks or garbles Longtail's training metadata."""


@dataclasses.dataclass(frozen=True)
class DatanetShare:
    """One Datanet behind an adapter and its share of the adapter's attribution, in basis points."""

    datanet_id: str
    name: str
    share_bps: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TextCodec:
    """How text becomes token ids and back; `decode` is optional (no samples without it)."""

    encode: Callable[[str], list[int]]
    eos_token_id: int
    decode: Callable[[list[int]], str] | None = None


def codec_from_tokenizer(tokenizer) -> TextCodec:
    """Wrap a Hugging Face tokenizer: no special tokens inside records, EOS between them."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainingError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id to separate records")
    return TextCodec(
        encode=lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]),
        eos_token_id=int(eos),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run; all but `checkpoint_every` must match to resume."""

    rank: int = 8
    alpha: int | None = None  # default 2 * rank
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 24
    lr: float = 3e-3
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0
    lora_dropout: float = 0.0
    eval_fraction: float = 0.05
    eval_blocks: int = 4  # per Datanet, so the cost of evaluating is bounded
    warmup_steps: int = 2
    checkpoint_every: int = 8
    sample_tokens: int = 32

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.rank

    def validate(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank {self.rank} < 1")
        if self.steps < 1:
            problems.append(f"steps {self.steps} < 1")
        if self.seq_len < 2:
            problems.append(f"seq_len {self.seq_len} < 2")
        if self.batch_size < 1:
            problems.append(f"batch_size {self.batch_size} < 1")
        if not self.lr > 0:
            problems.append(f"lr {self.lr} is not positive")
        if not 0 < self.eval_fraction < 1:
            problems.append(f"eval_fraction {self.eval_fraction} not in (0, 1)")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every {self.checkpoint_every} < 1")
        if not self.targets:
            problems.append("no target modules")
        if problems:
            raise TrainingError("invalid training settings: " + ", ".join(problems))

    def resume_key(self) -> dict:
        """The settings a checkpoint must share with this run to be continued."""
        key = dataclasses.asdict(self)
        key.pop("checkpoint_every")
        key["alpha"] = self.lora_alpha
        key["targets"] = list(self.targets)
        return key


@dataclasses.dataclass(frozen=True)
class TrainingEvent:
    """A progress report: a phase starting (`step` None) or an optimizer step done."""

    phase: str  # "load", "eval-before", "train", "checkpoint", "eval-after", "save"
    step: int | None = None
    total_steps: int = 0
    loss: float | None = None
    message: str = ""


@dataclasses.dataclass(frozen=True)
class Sample:
    """A greedy continuation of a held-out record's opening words, before and after training."""

    prompt: str
    before: str
    after: str


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What one finished run produced and measured."""

    out_dir: Path
    adapter_file: Path
    adapter_id: str
    base_model_id: str
    datanets: tuple[DatanetShare, ...]
    steps: int
    resumed_from_step: int
    eval_loss_before: float
    eval_loss_after: float
    eval_loss_by_datanet: dict[str, tuple[float, float]]
    train_tokens: int
    train_seconds: float
    total_seconds: float
    adapter_bytes: int
    samples: tuple[Sample, ...]

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "adapter_file": str(self.adapter_file),
            "adapter_id": self.adapter_id,
            "base_model_id": self.base_model_id,
            "datanets": [share.to_json() for share in self.datanets],
            "steps": self.steps,
            "resumed_from_step": self.resumed_from_step,
            "eval_loss_before": self.eval_loss_before,
            "eval_loss_after": self.eval_loss_after,
            "eval_loss_by_datanet": {
                name: {"before": before, "after": after}
                for name, (before, after) in self.eval_loss_by_datanet.items()
            },
            "train_tokens": self.train_tokens,
            "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds,
            "adapter_bytes": self.adapter_bytes,
            "samples": [dataclasses.asdict(sample) for sample in self.samples],
        }


@dataclasses.dataclass(frozen=True)
class AdapterProvenance:
    """Longtail's metadata read back from an adapter's safetensors header."""

    datanets: tuple[DatanetShare, ...]
    base_model_id: str
    training: dict


# ---------------------------------------------------------------- shares


def resolve_shares(datanet_dirs: Sequence[Path], shares: Sequence[int] | None) -> tuple[DatanetShare, ...]:
    """Read each Datanet's manifest and pair it with its share; one Datanet alone gets 10000."""
    if not datanet_dirs:
        raise ShareError("at least one --datanet is needed")
    if not shares:
        if len(datanet_dirs) > 1:
            raise ShareError(f"{len(datanet_dirs)} Datanets need {len(datanet_dirs)} --share values (basis points)")
        shares = [TOTAL_BPS]
    if len(shares) != len(datanet_dirs):
        raise ShareError(f"{len(datanet_dirs)} Datanets but {len(shares)} shares: give one --share per --datanet")
    resolved = []
    for folder, share in zip(datanet_dirs, shares, strict=True):
        try:
            manifest = load_manifest(Path(folder))
        except DatanetError as error:
            raise TrainingError(f"{folder} is not a Datanet: {error}") from error
        resolved.append(DatanetShare(datanet_id=manifest.datanet_id, name=manifest.name, share_bps=int(share)))
    validate_shares(resolved)
    return tuple(resolved)


def validate_shares(shares: Sequence[DatanetShare]) -> None:
    """Positive, distinct Datanets whose shares sum to exactly 10000 basis points."""
    if not shares:
        raise ShareError("an adapter needs at least one Datanet share")
    for share in shares:
        if share.share_bps <= 0 or share.share_bps > TOTAL_BPS:
            raise ShareError(f"share of {share.name} is {share.share_bps} bps; each must be in 1..{TOTAL_BPS}")
    ids = [share.datanet_id.lower() for share in shares]
    if len(set(ids)) != len(ids):
        raise ShareError(f"a Datanet appears twice: {[share.name for share in shares]}")
    total = sum(share.share_bps for share in shares)
    if total != TOTAL_BPS:
        raise ShareError(f"shares {[share.share_bps for share in shares]} sum to {total}, not {TOTAL_BPS}")


# ---------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class DatanetBlocks:
    """One Datanet's records tokenized and packed into training and held-out blocks."""

    name: str
    share_bps: int
    train: torch.Tensor  # (n_train, seq_len) int64
    held_out: torch.Tensor  # (n_eval, seq_len) int64
    sample_prompt: str


def pack(token_lists: Sequence[list[int]], eos_token_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate records with EOS between them and cut the stream into full `seq_len` blocks."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        stream.append(eos_token_id)
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _opening_words(text: str, words: int = 8) -> str:
    return " ".join(text.split()[:words])


def prepare_blocks(folder: Path, share: DatanetShare, codec: TextCodec, config: TrainConfig) -> DatanetBlocks:
    """Split records into train and held-out by a seeded shuffle, then tokenize and pack each side."""
    records = read_records(Path(folder))
    if len(records) < 2:
        raise TrainingError(f"{folder} holds {len(records)} record(s); training needs at least 2")
    order = list(range(len(records)))
    random.Random(f"{config.seed}:{share.datanet_id}").shuffle(order)
    held_count = max(1, round(len(records) * config.eval_fraction))
    held = [records[i] for i in order[:held_count]]
    train = [records[i] for i in order[held_count:]]
    train_blocks = pack([codec.encode(r.text) for r in train], codec.eos_token_id, config.seq_len)
    held_blocks = pack([codec.encode(r.text) for r in held], codec.eos_token_id, config.seq_len)
    if len(train_blocks) == 0 or len(held_blocks) == 0:
        raise TrainingError(
            f"{share.name}: too little text for seq_len {config.seq_len} "
            f"({len(train_blocks)} training and {len(held_blocks)} held-out blocks)"
        )
    return DatanetBlocks(
        name=share.name,
        share_bps=share.share_bps,
        train=train_blocks,
        held_out=held_blocks[: config.eval_blocks],
        sample_prompt=_opening_words(held[0].text),
    )


def batch_for_step(blocks: Sequence[DatanetBlocks], step: int, config: TrainConfig) -> torch.Tensor:
    """The batch of step `step`, a pure function of (seed, step): each row's Datanet is drawn by share.

    Because it keeps no state, a resumed run draws exactly the batches the
    uninterrupted run would have drawn.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    weights = torch.tensor([b.share_bps for b in blocks], dtype=torch.float64)
    sources = torch.multinomial(weights, config.batch_size, replacement=True, generator=generator)
    rows = []
    for source in sources.tolist():
        pool = blocks[source].train
        index = int(torch.randint(len(pool), (1,), generator=generator))
        rows.append(pool[index])
    return torch.stack(rows)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of `lr` at the last step (step counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- model


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: Sequence[DatanetBlocks], batch_size: int) -> dict[str, float]:
    """Mean next-token loss on each Datanet's held-out blocks."""
    was_training = model.training
    model.eval()
    losses = {}
    for datanet in blocks:
        total, count = 0.0, 0
        for start in range(0, len(datanet.held_out), batch_size):
            chunk = datanet.held_out[start : start + batch_size]
            loss = model(input_ids=chunk, labels=chunk).loss
            total += float(loss) * len(chunk)
            count += len(chunk)
        losses[datanet.name] = total / count
    model.train(was_training)
    return losses


def weighted_loss(losses: dict[str, float], blocks: Sequence[DatanetBlocks]) -> float:
    """Share-weighted mean of per-Datanet losses: the figure the adapter is judged by."""
    return sum(losses[b.name] * b.share_bps for b in blocks) / TOTAL_BPS


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, codec: TextCodec, prompt: str, max_new_tokens: int) -> str:
    """A short greedy continuation, used only to show the shift toward the domain."""
    if codec.decode is None or max_new_tokens <= 0:
        return ""
    was_training = model.training
    model.eval()
    ids = torch.tensor([codec.encode(prompt)], dtype=torch.long)
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=codec.eos_token_id,
    )
    model.train(was_training)
    return codec.decode(output[0, ids.shape[1] :].tolist())


# ---------------------------------------------------------------- checkpoints


def _save_checkpoint(out_dir: Path, model, optimizer, state: dict) -> None:
    """Write into a fresh folder and swap it in, so a crash mid-write keeps the previous checkpoint."""
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINT_DIR
    staging = out_dir / (CHECKPOINT_DIR + ".tmp")
    previous = out_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({name: p.detach().contiguous() for name, p in _trainable(model).items()}, str(staging / "adapter.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, staging / "rng.pt")
    (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def _checkpoint_folder(out_dir: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        if (out_dir / name / "state.json").is_file():
            return out_dir / name
    return None


def _load_checkpoint(folder: Path, model, optimizer) -> dict:
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "adapter.safetensors"))
        optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)
        rng = torch.load(folder / "rng.pt", weights_only=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise TrainingError(f"checkpoint {folder} is unreadable: {error}; rerun with --no-resume") from error
    trainable = _trainable(model)
    if set(weights) != set(trainable):
        raise TrainingError(f"checkpoint {folder} holds other LoRA tensors than this model; rerun with --no-resume")
    with torch.no_grad():
        for name, tensor in weights.items():
            trainable[name].copy_(tensor)
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state


# ---------------------------------------------------------------- output


def _metadata(datanets: Sequence[DatanetShare], base_id: str, training: dict) -> dict[str, str]:
    return {
        "format": "pt",
        META_DATANETS: json.dumps([d.to_json() for d in datanets], separators=(",", ":")),
        META_BASE_MODEL: base_id,
        META_TRAINING: json.dumps(training, sort_keys=True, separators=(",", ":")),
    }


def write_adapter(peft_model, out_dir: Path, base_name: str, metadata: dict[str, str]) -> Path:
    """Save the PEFT folder, then rewrite its safetensors file with Longtail's metadata in the header.

    `base_model_name_or_path` is set to the base's name, not a local path, because
    adapter_config.json is part of the bytes adapterId hashes and must not depend
    on where the trainer kept the model.
    """
    from safetensors.torch import load_file, save_file

    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    # PEFT's boilerplate model card says nothing longtail.json does not; keep the folder to what is served.
    (out_dir / "README.md").unlink(missing_ok=True)
    path = out_dir / ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_adapter_metadata(adapter_dir: Path) -> AdapterProvenance:
    """Read and validate `longtail.*` from an adapter's safetensors header."""
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as error:
        raise MetadataError(f"cannot read the header of {path}: {error}") from error
    missing = [key for key in (META_DATANETS, META_BASE_MODEL, META_TRAINING) if key not in metadata]
    if missing:
        raise MetadataError(f"{path} lacks Longtail metadata {missing}")
    try:
        datanets = tuple(
            DatanetShare(datanet_id=str(d["datanet_id"]), name=str(d["name"]), share_bps=int(d["share_bps"]))
            for d in json.loads(metadata[META_DATANETS])
        )
        training = json.loads(metadata[META_TRAINING])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise MetadataError(f"{path}: malformed Longtail metadata: {error}") from error
    try:
        validate_shares(datanets)
    except ShareError as error:
        raise MetadataError(f"{path}: {error}") from error
    return AdapterProvenance(datanets=datanets, base_model_id=metadata[META_BASE_MODEL], training=training)


# ---------------------------------------------------------------- the run


def _load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    if not any((base / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TrainingError(f"{base} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        return AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError) as error:
        raise TrainingError(f"cannot load the tokenizer in {base}: {error}") from error



def train_adapter(
    base: Path,
    datanet_dirs: Sequence[Path],
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    shares: Sequence[int] | None = None,
    tokenizer=None,
    codec: TextCodec | None = None,
    resume: bool = True,
    on_event: Callable[[TrainingEvent], None] | None = None,
    owner: str | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `datanet_dirs` and write a PEFT folder with provenance to `out_dir`.

    Give a Hugging Face `tokenizer` or a `codec`; with neither, the tokenizer in
    the base model's folder is used. With `resume`, a matching checkpoint in
    `<out_dir>/checkpoint/` is continued; without it any checkpoint is discarded.
    The checkpoint is removed once the adapter is written. With `owner` (the address that will register the
    adapter), adapter_config.json declares it and the Datanet shares (peft_format.OwnerDeclaration): nodes
    serve the adapter for pay only under a registration that matches (docs/security.md, attack 5).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from longtail.serving.base_models import base_model_id
    from longtail.serving.peft_format import AdapterRejected, adapter_id_of, declaration_of, write_declaration

    started = time.perf_counter()
    emit = on_event or (lambda event: None)
    config.validate()
    base = Path(base)
    out_dir = Path(out_dir)
    datanets = resolve_shares([Path(d) for d in datanet_dirs], shares)
    try:  # checked before hours of training, written after
        declaration = declaration_of(owner, [(d.datanet_id, d.share_bps) for d in datanets]) if owner else None
    except AdapterRejected as error:
        raise TrainingError(f"--owner: {error}") from None

    emit(TrainingEvent("load", message=f"loading {base.name} and tokenizing {len(datanets)} Datanet(s)"))
    if codec is None:
        if tokenizer is None:
            tokenizer = _load_tokenizer(base)
        codec = codec_from_tokenizer(tokenizer)
    blocks = [prepare_blocks(Path(d), share, codec, config) for d, share in zip(datanet_dirs, datanets, strict=True)]
    base_id = base_model_id(base)

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.targets),
        lora_dropout=config.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 API that warns of its own rename; nothing for users to do.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora)
    except ValueError as error:
        raise TrainingError(f"targets {list(config.targets)} do not fit {base.name}: {error}") from error
    optimizer = torch.optim.AdamW(list(_trainable(model).values()), lr=config.lr, weight_decay=0.0)

    resume_key = {
        **config.resume_key(),
        "base_model_id": base_id,
        "datanets": [d.to_json() for d in datanets],
    }
    start_step, losses, train_seconds = 0, [], 0.0
    checkpoint = _checkpoint_folder(out_dir)
    if checkpoint is not None and not resume:
        shutil.rmtree(checkpoint)
        checkpoint = None
    if checkpoint is not None:
        saved_key = json.loads((checkpoint / "state.json").read_text()).get("resume_key", {})
        differences = {
            key: (saved_key.get(key), resume_key.get(key))
            for key in sorted(set(saved_key) | set(resume_key))
            if saved_key.get(key) != resume_key.get(key)
        }
        if differences:
            raise ResumeMismatch(checkpoint, differences)
        state = _load_checkpoint(checkpoint, model, optimizer)
        start_step, losses, train_seconds = state["step"], state["losses"], state["train_seconds"]
        eval_before, prompts, samples_before = state["eval_before"], state["prompts"], state["samples_before"]
        emit(TrainingEvent("load", step=start_step, total_steps=config.steps, message=f"resuming at step {start_step}"))
    else:
        emit(TrainingEvent("eval-before", message="held-out loss and samples before training"))
        eval_before = evaluate(model, blocks, config.batch_size)
        prompts = [b.sample_prompt for b in blocks]
        samples_before = [greedy_continuation(model, codec, p, config.sample_tokens) for p in prompts]

    model.train()

    def state_for(step: int) -> dict:
        """The checkpoint's JSON half: what a resumed run cannot recompute from the weights."""
        return {
            "step": step,
            "losses": losses,
            "train_seconds": train_seconds,
            "eval_before": eval_before,
            "prompts": prompts,
            "samples_before": samples_before,
            "resume_key": resume_key,
        }

    done, updating = start_step, False
    try:
        for step in range(start_step, config.steps):
            step_started = time.perf_counter()
            rate = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = rate
            batch = batch_for_step(blocks, step, config)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(_trainable(model).values()), 1.0)
            updating = True
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            train_seconds += time.perf_counter() - step_started
            done, updating = step + 1, False
            emit(TrainingEvent("train", step=done, total_steps=config.steps, loss=losses[-1]))
            if done % config.checkpoint_every == 0 and done < config.steps:
                _save_checkpoint(out_dir, model, optimizer, state_for(done))
                emit(TrainingEvent("checkpoint", step=done, total_steps=config.steps, message=f"checkpoint at {done}"))
    except KeyboardInterrupt:
        # Ctrl-C between updates keeps the work done so far; inside an update the weights
        # may be half-written, so the previous checkpoint stands.
        if not updating and done > start_step:
            _save_checkpoint(out_dir, model, optimizer, state_for(done))
        raise

    emit(TrainingEvent("eval-after", message="held-out loss and samples after training"))
    eval_after = evaluate(model, blocks, config.batch_size)
    samples_after = [greedy_continuation(model, codec, p, config.sample_tokens) for p in prompts]
    loss_before, loss_after = weighted_loss(eval_before, blocks), weighted_loss(eval_after, blocks)

    emit(TrainingEvent("save", message=f"writing the adapter to {out_dir}"))
    # Only deterministic figures go into the hashed header; timings live in longtail.json.
    training = {
        **config.resume_key(),
        "eval_loss_before": round(loss_before, 4),
        "eval_loss_after": round(loss_after, 4),
        "train_tokens": config.steps * config.batch_size * config.seq_len,
    }
    training.pop("sample_tokens")
    adapter_file = write_adapter(model, out_dir, base.name, _metadata(datanets, base_id, training))
    if declaration is not None:  # inside the adapterId: written before it is computed below
        write_declaration(out_dir, declaration)
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)

    result = TrainResult(
        out_dir=out_dir,
        adapter_file=adapter_file,
        adapter_id=adapter_id_of(out_dir),
        base_model_id=base_id,
        datanets=datanets,
        steps=config.steps,
        resumed_from_step=start_step,
        eval_loss_before=loss_before,
        eval_loss_after=loss_after,
        eval_loss_by_datanet={b.name: (eval_before[b.name], eval_after[b.name]) for b in blocks},
        train_tokens=training["train_tokens"],
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        adapter_bytes=adapter_file.stat().st_size,
        samples=tuple(
            Sample(prompt=p, before=b, after=a) for p, b, a in zip(prompts, samples_before, samples_after, strict=True)
        ),
    )
    summary = {**result.to_json(), "training": training, "step_losses": [round(x, 4) for x in losses]}
    summary["out_dir"], summary["adapter_file"] = ".", ADAPTER_WEIGHTS_FILE
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return result
