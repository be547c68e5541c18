"""`longtail train`: LoRA training lowers held-out loss, resumes exactly, and binds Datanet shares to the adapter.

Most tests train the session's tiny random Llama on tiny templated Datanets with a
byte-level codec (the tiny model has no tokenizer), so each run takes well under a
second. The last test checks the adapters shipped in data/adapters against the
real embedded base model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from eth_utils import to_checksum_address
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from longtail.attribution.datanets import Record, build_manifest, load_manifest, write_datanet
from longtail.serving.base_models import EMBEDDED_MODEL_NAME, base_model_id, embedded_model_dir, is_model_dir
from longtail.serving.training import (
    META_DATANETS,
    DatanetBlocks,
    DatanetShare,
    MetadataError,
    ResumeMismatch,
    ShareError,
    TextCodec,
    TrainConfig,
    TrainingError,
    batch_for_step,
    read_adapter_metadata,
    resolve_shares,
    train_adapter,
    validate_shares,
)

REPO = Path(__file__).resolve().parents[2]
BYTE_OFFSET = 3  # ids 0..2 are the tiny model's unk/bos/eos; bytes map to 3..258 < vocab 384
EOS = 2

BYTE_CODEC = TextCodec(
    encode=lambda text: [b + BYTE_OFFSET for b in text.encode("utf-8")],
    eos_token_id=EOS,
    decode=lambda ids: bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET).decode(
        "utf-8", errors="replace"
    ),
)

# Small and quick, but enough steps at a high rate for a random model to learn the template.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = TrainConfig(rank=4, targets=ALL_PROJECTIONS, steps=12, lr=2e-2, seq_len=32, batch_size=4,
                   checkpoint_every=4, sample_tokens=8)


def _contributor(i: int) -> str:
    return to_checksum_address("0x" + f"{i + 1:040x}")


def make_datanet(root: Path, name: str, template: str, count: int = 40) -> Path:
    """A templated Datanet: the model can learn it from a few hundred tokens."""
    records = [
        Record(id=f"{name}-{i:03d}", text=template.format(i=i % 7), contributor=_contributor(i % 5))
        for i in range(count)
    ]
    folder = root / name
    write_datanet(folder, build_manifest(name, _contributor(99), records, domain="test"), records)
    return folder


@pytest.fixture(scope="module")
def datanets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datanets")
    return {
        "clauses": make_datanet(root, "clauses", "Clause {i}: the tenant shall pay rent on day {i} of each month."),
        "recipes": make_datanet(root, "recipes", "Recipe {i}: whisk {i} eggs with butter and bake for {i}0 minutes."),
    }


@pytest.fixture(scope="module")
def learnable_base(tiny_llama, tmp_path_factory) -> Path:
    """The session's tiny Llama with its RMSNorm weights reset to 1.

    The fixture draws every weight from N(0, 0.08), norms included, so the final
    norm squashes the logits to near-uniform and no LoRA can sharpen them; with
    unit norms the same random model learns a template in a dozen steps.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
    folder = tmp_path_factory.mktemp("learnable") / "tiny-base"
    model.save_pretrained(folder)
    return folder


def _train(base: Path, datanet_dirs, out: Path, config: TrainConfig = TINY, **kwargs):
    return train_adapter(base, datanet_dirs, out, config, codec=BYTE_CODEC, **kwargs)


def _held_out_loss(model, result_blocks: list[DatanetBlocks]) -> float:
    with torch.no_grad():
        return float(model(input_ids=result_blocks[0].held_out, labels=result_blocks[0].held_out).loss)


# ---------------------------------------------------------------- training


def test_training_lowers_held_out_loss_and_peft_loads_the_result(learnable_base, datanets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtail.serving.training import prepare_blocks

    out = tmp_path / "adapter"
    result = _train(learnable_base, [datanets["clauses"]], out)

    assert result.steps == TINY.steps and result.resumed_from_step == 0
    assert result.eval_loss_after < 0.8 * result.eval_loss_before, (result.eval_loss_before, result.eval_loss_after)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint").exists(), "the checkpoint is dropped once the adapter is written"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == sorted(ALL_PROJECTIONS)
    # adapter_config.json is hashed into adapterId: no local path may leak into it.
    assert config["base_model_name_or_path"] == learnable_base.name

    # PEFT itself is the oracle: the written folder reproduces the trained model's held-out loss.
    base = AutoModelForCausalLM.from_pretrained(learnable_base, dtype=torch.float32)
    blocks = [prepare_blocks(datanets["clauses"], result.datanets[0], BYTE_CODEC, TINY)]
    base_loss = _held_out_loss(base, blocks)
    loaded = PeftModel.from_pretrained(base, out).eval()
    assert _held_out_loss(loaded, blocks) == pytest.approx(result.eval_loss_after, rel=1e-4)
    assert base_loss == pytest.approx(result.eval_loss_before, rel=1e-4)

    summary = json.loads((out / "longtail.json").read_text())
    assert summary["eval_loss_after"] == pytest.approx(result.eval_loss_after)
    assert summary["train_seconds"] > 0 and len(summary["step_losses"]) == TINY.steps
    assert summary["samples"][0]["prompt"].startswith("Clause")


@pytest.mark.parametrize(
    ("failure", "checkpoint_step"),
    [(RuntimeError, 8), (KeyboardInterrupt, 10)],
    ids=["crash-keeps-last-periodic-checkpoint", "ctrl-c-saves-current-step"],
)
def test_interrupted_run_resumes_to_the_same_result(learnable_base, datanets, tmp_path, failure, checkpoint_step):
    straight = _train(learnable_base, [datanets["clauses"]], tmp_path / "straight")

    out = tmp_path / "interrupted"

    def stop_at_ten(event):
        if event.phase == "train" and event.step == 10:
            raise failure("stopped by the test")

    with pytest.raises(failure):
        _train(learnable_base, [datanets["clauses"]], out, on_event=stop_at_ten)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == checkpoint_step
    assert not (out / "adapter_model.safetensors").exists()

    resumed = _train(learnable_base, [datanets["clauses"]], out)
    assert resumed.resumed_from_step == checkpoint_step
    assert resumed.steps == straight.steps == TINY.steps
    assert resumed.eval_loss_before == pytest.approx(straight.eval_loss_before, rel=1e-6)
    assert resumed.eval_loss_after == pytest.approx(straight.eval_loss_after, rel=1e-4)
    resumed_losses = json.loads((out / "longtail.json").read_text())["step_losses"]
    straight_losses = json.loads((tmp_path / "straight" / "longtail.json").read_text())["step_losses"]
    assert resumed_losses == pytest.approx(straight_losses, abs=2e-4)
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_resume_refuses_a_checkpoint_with_other_settings(learnable_base, datanets, tmp_path):
    out = tmp_path / "adapter"

    def crash(event):
        if event.phase == "checkpoint":
            raise RuntimeError("stop after the first checkpoint")

    with pytest.raises(RuntimeError):
        _train(learnable_base, [datanets["clauses"]], out, on_event=crash)

    other = TrainConfig(**{**TINY.__dict__, "rank": 8})
    with pytest.raises(ResumeMismatch) as caught:
        _train(learnable_base, [datanets["clauses"]], out, other)
    assert caught.value.differences["rank"] == (4, 8)
    assert "--no-resume" in str(caught.value)

    fresh = _train(learnable_base, [datanets["clauses"]], out, other, resume=False)
    assert fresh.resumed_from_step == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


# ---------------------------------------------------------------- shares and metadata


def test_two_datanets_record_ids_shares_and_base_in_the_hashed_header(learnable_base, datanets, tmp_path):
    from longtail.serving.peft_format import adapter_id_of

    out = tmp_path / "mixed"
    result = _train(learnable_base, [datanets["clauses"], datanets["recipes"]], out, shares=[7000, 3000])

    provenance = read_adapter_metadata(out)
    expected = [
        DatanetShare(load_manifest(datanets["clauses"]).datanet_id, "clauses", 7000),
        DatanetShare(load_manifest(datanets["recipes"]).datanet_id, "recipes", 3000),
    ]
    assert list(provenance.datanets) == expected == list(result.datanets)
    assert provenance.base_model_id == base_model_id(learnable_base)
    assert provenance.training["steps"] == TINY.steps and provenance.training["rank"] == 4
    assert provenance.training["eval_loss_after"] == pytest.approx(result.eval_loss_after, abs=1e-4)
    assert set(result.eval_loss_by_datanet) == {"clauses", "recipes"}

    summary = json.loads((out / "longtail.json").read_text())
    assert summary["datanets"] == [share.to_json() for share in expected]
    assert summary["base_model_id"] == provenance.base_model_id
    assert summary["adapter_id"] == adapter_id_of(out)

    # The shares are in the bytes adapterId hashes: changing one changes the id.
    tensors = load_file(str(out / "adapter_model.safetensors"))
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata[META_DATANETS] = metadata[META_DATANETS].replace("7000", "6000").replace("3000", "4000")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata=metadata)
    assert adapter_id_of(out) != summary["adapter_id"]
    assert [d.share_bps for d in read_adapter_metadata(out).datanets] == [6000, 4000]


def test_batches_follow_the_shares_and_depend_only_on_seed_and_step():
    pools = [
        DatanetBlocks("a", 7000, torch.zeros(5, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), ""),
        DatanetBlocks("b", 3000, torch.ones(5, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), ""),
    ]
    config = TrainConfig(batch_size=50, seq_len=4)
    rows = torch.cat([batch_for_step(pools, step, config) for step in range(40)])
    from_a = float((rows[:, 0] == 0).float().mean())
    assert from_a == pytest.approx(0.7, abs=0.03)
    assert torch.equal(batch_for_step(pools, 17, config), batch_for_step(pools, 17, config))
    assert not torch.equal(batch_for_step(pools, 17, config), batch_for_step(pools, 18, config))


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        ([7000, 2000], "sum to 9000, not 10000"),
        ([10000], "2 Datanets but 1 shares"),
        (None, "2 Datanets need 2 --share values"),
        ([12000, -2000], "each must be in 1..10000"),
    ],
)
def test_bad_shares_are_refused_with_the_numbers(datanets, shares, message):
    with pytest.raises(ShareError, match=message):
        resolve_shares([datanets["clauses"], datanets["recipes"]], shares)


def test_a_datanet_named_twice_is_refused(datanets):
    with pytest.raises(ShareError, match="appears twice"):
        resolve_shares([datanets["clauses"], datanets["clauses"]], [5000, 5000])
    with pytest.raises(TrainingError, match="is not a Datanet"):
        resolve_shares([datanets["clauses"].parent / "missing"], None)


def test_metadata_reader_rejects_adapters_without_valid_shares(tiny_llama, tmp_path):
    with pytest.raises(MetadataError, match="lacks Longtail metadata"):
        read_adapter_metadata(tiny_llama.adapter_dirs["r4-attn"])

    folder = tmp_path / "forged"
    shutil.copytree(tiny_llama.adapter_dirs["r4-attn"], folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    forged = [{"datanet_id": "0x" + "11" * 32, "name": "x", "share_bps": 9999}]
    metadata = {META_DATANETS: json.dumps(forged), "longtail.base_model_id": "0x" + "22" * 32, "longtail.training": "{}"}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=metadata)
    with pytest.raises(MetadataError, match="sum to 9999"):
        read_adapter_metadata(folder)
    with pytest.raises(ShareError):
        validate_shares([DatanetShare("0x" + "11" * 32, "x", 0), DatanetShare("0x" + "22" * 32, "y", 10000)])


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_model_with_tokenizer(learnable_base, datanets, tmp_path_factory) -> Path:
    """The tiny base plus a small BPE tokenizer, so the CLI's default tokenizer path runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-with-tokenizer") / "tiny-base"
    shutil.copytree(learnable_base, folder)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    texts = [line for d in datanets.values() for line in (d / "records.jsonl").read_text().splitlines()]
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(folder)
    return folder


def test_cli_trains_and_reports_json(tiny_model_with_tokenizer, datanets, tmp_path):
    from longtail.node.commands.train import app

    out = tmp_path / "cli-adapter"
    args = ["--base", str(tiny_model_with_tokenizer), "--datanet", str(datanets["clauses"]),
            "--datanet", str(datanets["recipes"]), "--share", "6000", "--share", "4000",
            "--rank", "4", "--out", str(out), "--steps", "6", "--lr", "0.02", "--seq-len", "16",
            "--batch-size", "4", "--targets", "q_proj,k_proj,v_proj,o_proj", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 6 and report["eval_loss_after"] < report["eval_loss_before"]
    assert [d["share_bps"] for d in report["datanets"]] == [6000, 4000]
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    assert read_adapter_metadata(out).datanets[1].name == "recipes"


def test_cli_refuses_bad_shares_in_one_line(tiny_model_with_tokenizer, datanets, tmp_path):
    from longtail.node.commands.train import app

    args = ["--base", str(tiny_model_with_tokenizer), "--datanet", str(datanets["clauses"]),
            "--datanet", str(datanets["recipes"]), "--share", "6000", "--share", "3000",
            "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "sum to 9000, not 10000" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_cli_names_a_base_without_tokenizer(learnable_base, datanets, tmp_path):
    from longtail.node.commands.train import app

    args = ["--base", str(learnable_base), "--datanet", str(datanets["clauses"]), "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "has no tokenizer" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- the shipped demo adapters

SHIPPED = {
    "legal-r8": (8, {"legal-clauses": 10000}),
    "recipes-r16": (16, {"kitchen-recipes": 10000}),
    "clinical-code-r8": (8, {"clinical-notes": 6000, "code-reviews": 4000}),
    "reviews-r4": (4, {"code-reviews": 10000}),
}


@pytest.fixture(scope="module")
def embedded_base() -> Path:
    folder = embedded_model_dir()
    if not is_model_dir(folder):
        pytest.skip(f"the embedded base model {EMBEDDED_MODEL_NAME} is not at {folder}: run `make setup`")
    return folder


@pytest.mark.slow
def test_shipped_adapters_load_on_the_embedded_base_and_name_real_datanets(embedded_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longtail.serving.training import codec_from_tokenizer, prepare_blocks

    manifests = {p.name: load_manifest(p) for p in (REPO / "data" / "datanets").iterdir() if p.is_dir()}
    base_id = base_model_id(embedded_base)
    base = AutoModelForCausalLM.from_pretrained(embedded_base, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    codec = codec_from_tokenizer(AutoTokenizer.from_pretrained(embedded_base))
    model = None
    for name, (rank, shares) in SHIPPED.items():
        folder = REPO / "data" / "adapters" / name
        assert (folder / "adapter_model.safetensors").stat().st_size < 5_000_000, f"{name} is too big for git"
        provenance = read_adapter_metadata(folder)
        assert provenance.base_model_id == base_id, f"{name} was trained on another base"
        assert {d.name: d.share_bps for d in provenance.datanets} == shares
        for share in provenance.datanets:
            assert share.datanet_id == manifests[share.name].datanet_id, f"{name} names a Datanet id not in data/"
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == rank
        assert provenance.training["eval_loss_after"] < provenance.training["eval_loss_before"] - 0.5

        # One held-out block of the adapter's main Datanet, split exactly as training split it.
        main = provenance.datanets[0]
        config = TrainConfig(seed=provenance.training["seed"], seq_len=provenance.training["seq_len"], eval_blocks=1)
        block = prepare_blocks(REPO / "data" / "datanets" / main.name, main, codec, config).held_out
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
        model.set_adapter(name)
        with torch.no_grad():
            adapted = float(model(input_ids=block, labels=block).loss)
            with model.disable_adapter():
                plain = float(model(input_ids=block, labels=block).loss)
        assert adapted < plain - 0.5, f"{name}: held-out loss {adapted:.3f} with the adapter vs {plain:.3f} without"


def test_owner_is_declared_in_the_config_with_the_trained_shares(learnable_base, datanets, tmp_path):
    """`train --owner` writes the declaration nodes check against the Registry (issue 20, attack 5)."""
    from longtail.serving.peft_format import adapter_id_of, read_adapter_config, read_declaration
    from longtail.serving.training import TrainingError

    owner = to_checksum_address("0x" + "ab" * 20)
    out = tmp_path / "declared"
    result = _train(learnable_base, [datanets["clauses"], datanets["recipes"]], out, shares=[7000, 3000],
                    owner=owner.lower())
    declared = read_declaration(out)
    assert declared.owner == owner
    assert declared.datanets == tuple(sorted((d.datanet_id.lower(), d.share_bps) for d in result.datanets))
    assert read_adapter_config(out)["longtail"]["owner"] == owner
    assert result.adapter_id == adapter_id_of(out) == json.loads((out / "longtail.json").read_text())["adapter_id"]
    with pytest.raises(TrainingError, match="--owner"):
        _train(learnable_base, [datanets["clauses"]], tmp_path / "bad", owner="0x1234")
