"""PEFT adapter reading: scales and factors match PEFT itself; hostile files are rejected with a reason."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from eth_utils import keccak
from safetensors.torch import load_file, save_file

from longtail.serving.peft_format import (
    CONFIG_NAME,
    MAX_DECLARED_DATANETS,
    WEIGHTS_NAME,
    AdapterRejected,
    ModuleShapes,
    OwnerDeclaration,
    adapter_id_of,
    declaration_of,
    load_adapter,
    parse_declaration,
    read_adapter_config,
    read_declaration,
    read_safetensors_header,
    write_declaration,
)

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def shapes(tiny_llama) -> ModuleShapes:
    return ModuleShapes.from_model_dir(tiny_llama.base_dir)


def _copy(src: Path, tmp_path: Path, name: str = "adapter") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _peft_modules(base_dir: Path, adapter_dir: Path) -> dict[str, tuple[int, float]]:
    """PEFT's own rank and scaling for every adapted projection, keyed like ours."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    found = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            key = name.removeprefix("base_model.model.")
            found[key] = (module.r["default"], module.scaling["default"])
    return found


def _module_key(layer: int, module: str) -> str:
    parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{parent}.{module}"


@pytest.mark.parametrize("adapter", ["r4-attn", "r8-all", "r16-mlp-rslora", "r64-qko"])
def test_loaded_modules_reproduce_peft_delta(tiny_llama, shapes, adapter):
    """Ranks, scales (rank_pattern, alpha_pattern, rslora) and scale*B@A equal what PEFT merges into the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = tiny_llama.adapter_dirs[adapter]
    weights = load_adapter(adapter_dir, shapes)
    peft_modules = _peft_modules(tiny_llama.base_dir, adapter_dir)
    ours = {_module_key(m.layer, m.module): m for m in weights.modules}
    assert set(ours) == set(peft_modules)
    for key, (rank, scale) in peft_modules.items():
        assert ours[key].rank == rank
        assert ours[key].scale == pytest.approx(scale, rel=1e-12)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama.base_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    for key, module in ours.items():
        delta = merged[key + ".weight"] - base_state[key + ".weight"]
        torch.testing.assert_close(module.scale * module.lora_b @ module.lora_a, delta, atol=1e-6, rtol=1e-5)
    assert weights.nbytes == sum(m.lora_a.numel() * 4 + m.lora_b.numel() * 4 for m in weights.modules)


def test_patterns_and_rslora_scales(tiny_llama, shapes):
    """The fixture adapters exercise every scaling rule; check the numbers by hand as well."""
    by_module = {m.module: m for m in load_adapter(tiny_llama.adapter_dirs["r8-all"], shapes).modules}
    assert (by_module["o_proj"].rank, by_module["o_proj"].scale) == (2, 16 / 2)  # rank_pattern
    assert (by_module["q_proj"].rank, by_module["q_proj"].scale) == (8, 16 / 8)
    by_module = {m.module: m for m in load_adapter(tiny_llama.adapter_dirs["r64-qko"], shapes).modules}
    assert by_module["k_proj"].scale == 64 / 64  # alpha_pattern
    assert by_module["q_proj"].scale == 32 / 64
    rslora = load_adapter(tiny_llama.adapter_dirs["r16-mlp-rslora"], shapes).modules[0]
    assert rslora.scale == pytest.approx(8 / 16 ** 0.5)


def test_qwen2_shapes_and_dtype(tiny_qwen2):
    shapes = ModuleShapes.from_model_dir(tiny_qwen2.base_dir)
    weights = load_adapter(tiny_qwen2.adapter_dirs["r8-all"], shapes, dtype=torch.bfloat16)
    assert {m.lora_a.dtype for m in weights.modules} == {torch.bfloat16}
    k = next(m for m in weights.modules if m.module == "k_proj")
    assert tuple(k.lora_b.shape) == (32, 8)  # GQA: 2 kv heads x 16


def test_bf16_factors_round_as_torch_rounds_without_torch_threads(tiny_llama, shapes, tmp_path, monkeypatch):
    """A bf16 engine's factors are rounded in numpy on the loading thread: the same bits as torch's `.to`, and no
    torch conversion there (it would give the loader thread an OpenMP team, and libgomp then throttles the
    engine's: docs/serving.md), and a value that rounds past bf16's largest is refused."""
    from longtail.serving.peft_format import _bf16_bits

    values = torch.cat([torch.randn(4096) * 10 ** torch.randint(-30, 30, (4096,)).float(),
                        torch.tensor([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.3895e38, -1e-45])])
    assert torch.equal(torch.from_numpy(_bf16_bits(values.numpy())).view(torch.bfloat16), values.to(torch.bfloat16))
    folder = tiny_llama.adapter_dirs["r8-all"]
    fp32 = load_adapter(folder, shapes)
    conversions = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        if any(isinstance(a, torch.dtype) for a in (*args, *kwargs.values())) and self.dtype != torch.bfloat16:
            conversions.append(self.dtype)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    ours = load_adapter(folder, shapes, dtype=torch.bfloat16)
    monkeypatch.undo()
    assert conversions == []  # rounded in numpy, not by a torch op that would start an OpenMP team on this thread
    for mine, reference in zip(ours.modules, fp32.modules, strict=True):
        assert torch.equal(mine.lora_a, reference.lora_a.to(torch.bfloat16))
        assert torch.equal(mine.lora_b, reference.lora_b.to(torch.bfloat16))
    huge = _copy(folder, tmp_path)
    _rewrite_tensors(huge, lambda tensors: tensors.update({k: torch.full_like(t, 3.4e38) for k, t in tensors.items()
                                                           if "lora_B" in k}))
    with pytest.raises(AdapterRejected, match="overflow"):
        load_adapter(huge, shapes, dtype=torch.bfloat16)


def test_adapter_id_is_keccak_of_canonical_config_and_file(tiny_llama, tmp_path):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    expected = "0x" + keccak(canonical + (folder / WEIGHTS_NAME).read_bytes()).hex()
    assert adapter_id_of(folder) == expected
    assert load_adapter(folder, ModuleShapes.from_model_dir(tiny_llama.base_dir)).adapter_id == expected
    # Reformatting the JSON keeps the id; changing a value changes it.
    (folder / CONFIG_NAME).write_text(json.dumps(dict(reversed(list(config.items()))), indent=4))
    assert adapter_id_of(folder) == expected
    _edit_config(folder, lora_alpha=9)
    assert adapter_id_of(folder) != expected


# ---------------------------------------------------------------- hostile files


def test_pickle_checkpoints_are_refused_with_the_reason(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterRejected, match="arbitrary code"):
        load_adapter(folder, shapes)
    with pytest.raises(AdapterRejected, match="adapter_model.bin.*arbitrary code"):
        adapter_id_of(folder / "adapter_model.bin")
    for suffix in (".pt", ".pth", ".ckpt"):
        file = tmp_path / f"weights{suffix}"
        file.write_bytes(b"x")
        with pytest.raises(AdapterRejected, match="pickle"):
            load_adapter(file, shapes)


def test_truncated_files(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r8-all"], tmp_path)
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[:-100])
    with pytest.raises(AdapterRejected, match="outside the .*data region"):
        load_adapter(folder, shapes)
    (folder / WEIGHTS_NAME).write_bytes(data[:5])
    with pytest.raises(AdapterRejected, match="truncated"):
        load_adapter(folder, shapes)
    (folder / WEIGHTS_NAME).write_bytes(data[:60])
    with pytest.raises(AdapterRejected, match="truncated: header"):
        load_adapter(folder, shapes)


def test_oversized_header_is_rejected_without_reading_it(tmp_path):
    file = tmp_path / WEIGHTS_NAME
    file.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    started = time.perf_counter()
    with pytest.raises(AdapterRejected, match="over the .*-byte limit"):
        read_safetensors_header(file)
    assert time.perf_counter() - started < 0.5


def test_header_offsets_out_of_range_overlapping_and_holes(tmp_path):
    file = tmp_path / WEIGHTS_NAME
    entry = {"dtype": "F32", "shape": [2, 2]}
    _write_raw_safetensors(file, {"a": {**entry, "data_offsets": [0, 16]}, "b": {**entry, "data_offsets": [16, 32]}},
                           bytes(24))
    with pytest.raises(AdapterRejected, match="'b' data_offsets .* outside"):
        read_safetensors_header(file)
    _write_raw_safetensors(file, {"a": {**entry, "data_offsets": [0, 16]}, "b": {**entry, "data_offsets": [8, 24]}},
                           bytes(24))
    with pytest.raises(AdapterRejected, match="overlaps"):
        read_safetensors_header(file)
    _write_raw_safetensors(file, {"a": {**entry, "data_offsets": [0, 16]}}, bytes(20))
    with pytest.raises(AdapterRejected, match="cover"):
        read_safetensors_header(file)
    _write_raw_safetensors(file, {"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(AdapterRejected, match="needs 24 bytes"):
        read_safetensors_header(file)
    _write_raw_safetensors(file, {"a": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(AdapterRejected, match="dtype 'I64'"):
        read_safetensors_header(file)
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": 1}'
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(AdapterRejected, match="duplicate key"):
        read_safetensors_header(file)
    raw = b"[" * 100_000
    file.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(AdapterRejected, match="not valid JSON"):
        read_safetensors_header(file)


def _rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


def test_wrong_shape_is_rejected_naming_the_tensor(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({Q_A: torch.zeros(4, 63)}))
    with pytest.raises(AdapterRejected, match=r"q_proj.lora_A.weight' has shape \[4, 63\], expected \[4, 64\]"):
        load_adapter(folder, shapes)
    # An adapter trained for another base (hidden size 64) against a base of hidden size 32.
    other = ModuleShapes.from_hf_config({"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 80,
                                         "num_hidden_layers": 2, "num_key_value_heads": 2})
    with pytest.raises(AdapterRejected, match="expected"):
        load_adapter(tiny_llama.adapter_dirs["r4-attn"], other)
    deeper = ModuleShapes(num_layers=1, shapes=shapes.shapes)
    with pytest.raises(AdapterRejected, match="layer 1 but the base has 1 layers"):
        load_adapter(tiny_llama.adapter_dirs["r4-attn"], deeper)


def test_rank_disagreeing_with_config_is_rejected(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({Q_A: torch.zeros(5, 64), Q_B: torch.zeros(64, 5)}))
    with pytest.raises(AdapterRejected, match="rank 4 from the config"):
        load_adapter(folder, shapes)


def test_nan_filled_tensor_is_rejected(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({Q_B: torch.full((64, 4), float("nan"))}))
    with pytest.raises(AdapterRejected, match="q_proj.lora_B.weight' holds 256 non-finite"):
        load_adapter(folder, shapes)
    _rewrite_tensors(folder, lambda t: t.update({Q_B: torch.zeros(64, 4), Q_A: torch.full((4, 64), float("inf"))}))
    with pytest.raises(AdapterRejected, match="non-finite"):
        load_adapter(folder, shapes)


def test_renamed_module_is_rejected(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({Q_A.replace("q_proj", "qq_proj"): t.pop(Q_A)}))
    with pytest.raises(AdapterRejected, match="qq_proj.*not a LoRA factor"):
        load_adapter(folder, shapes)
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path, "renamed-config")
    _edit_config(folder, target_modules=["q_proj", "v_proj", "c_attn"])
    with pytest.raises(AdapterRejected, match="target module 'c_attn' does not exist"):
        load_adapter(folder, shapes)
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path, "untargeted")
    _edit_config(folder, target_modules=["v_proj"])
    with pytest.raises(AdapterRejected, match="q_proj, which the config's target_modules"):
        load_adapter(folder, shapes)
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path, "half")
    _rewrite_tensors(folder, lambda t: t.pop(Q_B))
    with pytest.raises(AdapterRejected, match="q_proj has no lora_B"):
        load_adapter(folder, shapes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "LOHA"}, "only 'LORA'"),
    ({"init_lora_weights": "pissa"}, "rewrites the base"),
    ({"some_future_feature": {"on": True}}, "unknown config field some_future_feature"),
    ({"r": 512}, "configured maximum rank"),
    ({"rank_pattern": {"q_proj": 0}}, "rank must be an integer"),
    ({"lora_alpha": "8"}, "lora_alpha must be a number"),
    ({"target_modules": None}, "target_modules is missing"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
])
def test_config_features_outside_plain_lora_are_rejected(tiny_llama, tmp_path, shapes, changes, message):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(AdapterRejected, match=message):
        load_adapter(folder, shapes)


def test_new_peft_fields_left_at_default_are_accepted(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    _edit_config(folder, some_future_feature=None, another_one=False)
    assert read_adapter_config(folder)["r"] == 4
    assert len(load_adapter(folder, shapes).modules) == 4


def test_hostile_patterns_do_not_hang(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    _edit_config(folder, rank_pattern={r"(?:.|\w|[a-z])*(?:.|\w)*(?:.|\w)*\d\d": 4})
    started = time.perf_counter()
    with pytest.raises(AdapterRejected, match="too long to match"):
        load_adapter(folder, shapes)
    assert time.perf_counter() - started < 5
    _edit_config(folder, rank_pattern={"q_proj": 4, "self_attn.q_proj": 8})
    with pytest.raises(AdapterRejected, match="ambiguous"):
        load_adapter(folder, shapes)


def test_malformed_config_json(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    (folder / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": NaN}')
    with pytest.raises(AdapterRejected, match="non-finite"):
        load_adapter(folder, shapes)
    (folder / CONFIG_NAME).write_text('{"r": 4, "r": 8}')
    with pytest.raises(AdapterRejected, match="duplicate key 'r'"):
        load_adapter(folder, shapes)
    (folder / CONFIG_NAME).write_bytes(b"\xff\xfe")
    with pytest.raises(AdapterRejected, match="not valid JSON"):
        load_adapter(folder, shapes)


def test_size_limit(tiny_llama, shapes):
    with pytest.raises(AdapterRejected, match="over the 1000-byte limit"):
        load_adapter(tiny_llama.adapter_dirs["r4-attn"], shapes, max_bytes=1000)


# ---------------------------------------------------------------- the owner declaration (issue 20, attack 5)

OWNER = "0x976EA74026E726554dB657fA54763abd0C3a0aa9"
DN_A, DN_B = "0x" + "1e" * 32, "0x" + "82" * 32


def test_declared_adapter_loads_here_and_in_peft_with_the_same_ranks_and_scales(tiny_llama, tmp_path, shapes):
    """The `longtail` key is validated and kept by our loader; HF PEFT ignores it; the weights mean the same."""
    folder = _copy(tiny_llama.adapter_dirs["r8-all"], tmp_path)
    before_id = adapter_id_of(folder)
    declaration = declaration_of(OWNER.lower(), [(DN_B, 4000), (DN_A, 6000)])
    write_declaration(folder, declaration)
    assert declaration == OwnerDeclaration(OWNER, ((DN_A, 6000), (DN_B, 4000)))
    assert read_declaration(folder) == declaration
    assert read_adapter_config(folder)["longtail"] == {"owner": OWNER, "datanets": [[DN_A, 6000], [DN_B, 4000]]}
    assert adapter_id_of(folder) != before_id  # the declaration is inside the content address
    ours = {_module_key(m.layer, m.module): (m.rank, m.scale) for m in load_adapter(folder, shapes).modules}
    assert ours == _peft_modules(tiny_llama.base_dir, folder)
    assert read_declaration(tiny_llama.adapter_dirs["r8-all"]) is None


def test_a_declaration_without_datanets_is_valid():
    assert parse_declaration({"owner": OWNER, "datanets": []}) == OwnerDeclaration(OWNER, ())


@pytest.mark.parametrize(("value", "message"), [
    ({"owner": OWNER.lower(), "datanets": []}, "checksummed"),
    ({"owner": OWNER[:-1] + "8", "datanets": []}, "checksummed"),
    ({"owner": "0x" + "00" * 20, "datanets": []}, "non-zero"),
    ({"owner": OWNER[:-2], "datanets": []}, "checksummed"),
    ({"owner": 12, "datanets": []}, "checksummed"),
    ({"owner": OWNER}, "exactly the keys"),
    ({"owner": OWNER, "datanets": [], "extra": 1}, "exactly the keys"),
    ([OWNER, []], "exactly the keys"),
    ({"owner": OWNER, "datanets": [[DN_B, 5000], [DN_A, 5000]]}, "sorted"),
    ({"owner": OWNER, "datanets": [[DN_A, 5000], [DN_A, 5000]]}, "sorted"),
    ({"owner": OWNER, "datanets": [[DN_A, 6000], [DN_B, 3999]]}, "sum to 9999"),
    ({"owner": OWNER, "datanets": [[DN_A, 10001]]}, "bps in 1..10000"),
    ({"owner": OWNER, "datanets": [[DN_A, 0], [DN_B, 10000]]}, "bps in 1..10000"),
    ({"owner": OWNER, "datanets": [[DN_A, True]]}, "bps in 1..10000"),
    ({"owner": OWNER, "datanets": [[DN_A, 10000.0]]}, "bps in 1..10000"),
    ({"owner": OWNER, "datanets": [[DN_A.upper().replace("0X", "0x"), 10000]]}, "lowercase"),
    ({"owner": OWNER, "datanets": [[DN_A[:-2], 10000]]}, "lowercase"),
    ({"owner": OWNER, "datanets": [["0x" + "00" * 32, 10000]]}, "names no Datanet"),
    ({"owner": OWNER, "datanets": [[DN_A, 10000, 1]]}, "lowercase"),
    ({"owner": OWNER, "datanets": {DN_A: 10000}}, "at most"),
    ({"owner": OWNER, "datanets": [["0x%064x" % (i + 1), 1] for i in range(MAX_DECLARED_DATANETS + 1)]}, "at most"),
])
def test_bad_declarations_are_rejected_with_the_reason(value, message):
    with pytest.raises(AdapterRejected, match=message):
        parse_declaration(value)


def test_bad_declaration_in_a_config_is_rejected_by_the_loader(tiny_llama, tmp_path, shapes):
    folder = _copy(tiny_llama.adapter_dirs["r4-attn"], tmp_path)
    _edit_config(folder, longtail={"owner": OWNER, "datanets": [[DN_B, 5000], [DN_A, 5000]]})
    with pytest.raises(AdapterRejected, match="sorted"):
        load_adapter(folder, shapes)
    _edit_config(folder, longtail={"owner": OWNER, "datanets": [[DN_A, 1]] * 20_000})  # ~1.5 MB: over the 1 MiB limit
    with pytest.raises(AdapterRejected, match="limit|larger|bytes"):
        read_declaration(folder)


def test_declaring_an_owner_with_a_wrong_checksum_is_refused():
    with pytest.raises(AdapterRejected, match="checksum"):
        declaration_of(OWNER[:-1] + "8", [])
    with pytest.raises(AdapterRejected, match="sum to"):
        declaration_of(OWNER, [(DN_A, 5000)])
