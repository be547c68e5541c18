"""On the embedded SmolLM2 itself, the engine's greedy tokens equal HF transformers' (chat template prompt)."""

from __future__ import annotations

import pytest
import torch

from serving import Engine, SamplingParams
from serving.base_models import embedded_model_dir
from serving.config import ModelConfig

pytestmark = pytest.mark.slow


def test_greedy_tokens_equal_hf_on_the_embedded_model():
    folder = embedded_model_dir()
    if not (folder / "config.json").exists():
        pytest.skip(f"embedded model not prepared at {folder}: run `make setup`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    engine = Engine.from_pretrained(folder, kv_cache_bytes=64 * 2**20)
    got = engine.generate([prompt], [None], SamplingParams(max_tokens=16, temperature=0.0))[0].token_ids
    assert got == expected.tolist()[: len(got)]
    assert "Paris" in tokenizer.decode(got)


def test_rope_settings_are_read_from_either_config_layout():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    assert ModelConfig.from_dict({**base, "rope_theta": 500000.0}).rope_theta == 500000.0
    nested = ModelConfig.from_dict({**base, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    assert nested.rope_theta == 100000.0 and nested.rope_scaling is None
    llama3 = ModelConfig.from_dict({**base, "rope_parameters": {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert llama3.rope_scaling["rope_type"] == "llama3"
    assert llama3.inverse_frequencies()[-1] < ModelConfig.from_dict({**base, "rope_theta": 500000.0}).inverse_frequencies()[-1]
