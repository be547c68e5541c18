"""`longtail adapter add|list|show|rm|verify --json` through typer's runner, on a real store under a temp home."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from longtail.node.commands.adapter import app
from longtail.serving.peft_format import WEIGHTS_NAME, adapter_id_of


@pytest.fixture()
def run(tmp_path):
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(app, list(args), env={"LONGTAIL_HOME": str(tmp_path)})
        assert result.exit_code == code, result.output
        return result

    return invoke


def test_add_list_show_verify_rm(tiny_llama, run, tmp_path):
    base = str(tiny_llama.base_dir)
    source = tiny_llama.adapter_dirs["r8-all"]
    added = json.loads(run("add", str(source), "--name", "chat", "--base", base, "--json").stdout)
    assert added["adapter_id"] == adapter_id_of(source)
    assert added["names"] == ["chat"] and added["max_rank"] == 8
    assert added["base_model_id"].startswith("0x") and len(added["base_model_id"]) == 66

    run("add", str(tiny_llama.adapter_dirs["r4-attn"]), "--base", base, "--json")
    listed = json.loads(run("list", "--json").stdout)
    assert [a["names"] for a in listed] == [["chat"], []]
    shown = json.loads(run("show", "chat", "--json").stdout)
    assert shown == added

    verified = json.loads(run("verify", "--json", "--base", base).stdout)
    assert [v["ok"] for v in verified] == [True, True]

    # Damage one stored file: verify exits 1 and says which adapter.
    stored = tmp_path / "adapters" / added["adapter_id"] / WEIGHTS_NAME
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.write_bytes(bytes(data))
    result = run("verify", "chat", "--json", code=1)
    assert json.loads(result.stdout) == [{"adapter_id": added["adapter_id"], "ok": False,
                                          "reason": json.loads(result.stdout)[0]["reason"]}]
    assert "hash to" in json.loads(result.stdout)[0]["reason"]

    removed = json.loads(run("rm", "chat", "--json").stdout)
    assert removed == {"removed": added["adapter_id"], "names": ["chat"]}
    assert len(json.loads(run("list", "--json").stdout)) == 1
    run("show", "chat", code=1)


def test_add_refuses_pickle_and_wrong_base(tiny_llama, run, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    result = run("add", str(pickled), "--base", str(tiny_llama.base_dir), code=1)
    assert "arbitrary code" in result.output
    run("add", str(tiny_llama.adapter_dirs["r4-attn"]), "--base", str(tmp_path / "no-such-model"), code=1)
    run("add", "http://127.0.0.1:9/v1/adapters", "--base", str(tiny_llama.base_dir), code=1)
