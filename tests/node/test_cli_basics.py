"""The `longtail` CLI's foundation commands, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longtail.node.cli import app

runner = CliRunner()
SHIPPED = Path(__file__).resolve().parents[2] / "data" / "datanets"


def test_every_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = [line.split()[1] for line in result.output.splitlines() if line.startswith("│ ") and len(line.split()) > 2]
    assert {"version", "doctor", "model", "datanet"} <= set(commands)
    for command in ["version", "doctor", "model", "model list", "model show", "model import", "datanet index",
                    "datanet", "datanet build", "datanet show", "datanet verify"]:
        assert runner.invoke(app, [*command.split(), "--help"]).exit_code == 0, command


def test_version_json_matches_the_installed_distribution():
    import importlib.metadata

    result = runner.invoke(app, ["version", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == {"longtail": importlib.metadata.version("longtail")}


def test_console_script_is_installed():
    done = subprocess.run([str(Path(sys.executable).parent / "longtail"), "version"], capture_output=True, text=True)
    assert done.returncode == 0 and "longtail" in done.stdout


def test_doctor_reports_every_part_and_fails_on_a_missing_one(monkeypatch):
    result = runner.invoke(app, ["doctor", "--json"])
    parts = {row["part"]: row for row in json.loads(result.output)}
    assert set(parts) == {"python", "torch + device", "triton", "anvil", "solc-js", "database", "base model"}
    assert result.exit_code == (0 if all(row["ready"] for row in parts.values()) else 1)
    monkeypatch.setenv("LONGTAIL_DATABASE_URL", "postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    broken = runner.invoke(app, ["doctor", "--json"])
    database = next(row for row in json.loads(broken.output) if row["part"] == "database")
    assert broken.exit_code == 1 and not database["ready"]
    assert "secret" not in broken.output, "the doctor must never print a password"


def test_datanet_verify_and_show(tmp_path):
    ok = runner.invoke(app, ["datanet", "verify", str(SHIPPED / "clinical-notes"), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["verified"] is True
    shown = json.loads(runner.invoke(app, ["datanet", "show", str(SHIPPED / "code-reviews"), "--json"]).output)
    assert shown["contributors"] >= 20 and shown["datanet_id"].startswith("0x")
    missing = runner.invoke(app, ["datanet", "verify", str(tmp_path)])
    assert missing.exit_code == 1 and "cannot read" in missing.output


def test_model_import_and_show_a_tiny_hf_folder(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTAIL_HOME", str(tmp_path))
    imported = runner.invoke(app, ["model", "import", str(tiny_llama.base_dir), "--name", "tiny", "--json"])
    assert imported.exit_code == 0, imported.output
    shown = json.loads(runner.invoke(app, ["model", "show", "tiny", "--json"]).output)
    assert shown["architecture"] == "llama" and shown["num_layers"] == 2
    assert shown["base_model_id"] == json.loads(imported.output)["base_model_id"]
    listed = json.loads(runner.invoke(app, ["model", "list", "--json"]).output)
    assert [m["name"] for m in listed] == ["tiny"]
    unknown = runner.invoke(app, ["model", "show", "nope"])
    assert unknown.exit_code == 1 and "no base model 'nope'" in unknown.output


@pytest.mark.slow
def test_embedded_base_model_loads_and_peft_wraps_it():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longtail.serving.base_models import describe, embedded_model_dir

    folder = embedded_model_dir()
    if not (folder / "config.json").exists():
        pytest.skip(f"embedded model not prepared at {folder}: run `make setup`")
    assert 130e6 < describe(folder).parameters < 140e6
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1]:])
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert trainable == 30 * 2 * 4 * (576 + 576) - 30 * 4 * (576 - 192)


def test_every_node_config_key_is_a_flag_of_node_run(monkeypatch):
    """The issue's promise: every option is a file key, an env variable and a flag (lists repeat the flag)."""
    import dataclasses

    import typer

    import longtail.node.commands.node as node_command
    from longtail.node.config import ConfigError, NodeConfig

    run = typer.main.get_command(app).commands["node"].commands["run"]
    flags = {opt for param in run.params for opt in [*param.opts, *param.secondary_opts]}
    for field in dataclasses.fields(NodeConfig):
        assert node_command.REPEATED_FLAG.get(field.name, "--" + field.name.replace("_", "-")) in flags, field.name
    seen = {}

    def capture(config, overrides):
        seen.update({k: v for k, v in overrides.items() if v is not None})
        raise ConfigError("captured")

    monkeypatch.setattr(node_command, "load_config", capture)
    result = runner.invoke(app, ["node", "run", "--adapter", "a", "--adapter", "b", "--kv-cache-bytes", "1024",
                                 "--no-engine-process", "--gil-switch-interval-ms", "0.2", "--peer", "/ip4/1.2.3.4/tcp/1"])
    assert result.exit_code == 2 and "captured" in result.output
    assert seen == {"adapters": ("a", "b"), "peers": ("/ip4/1.2.3.4/tcp/1",), "kv_cache_bytes": 1024,
                    "gil_switch_interval_ms": 0.2, "engine_process": False}
