"""The architecture read from config.json matches what HF builds (RoPE variants, context), and the engine's
greedy tokens equal HF's on the real embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longtail.serving.config import ModelConfig
from longtail.serving.engine import Engine
from longtail.serving.sampling import SamplingParams

REAL_MODEL = Path.home() / ".cache" / "longtail" / "models" / "smollm2-135m-instruct"

BASE = {"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


@pytest.mark.parametrize("rope", [
    {"rope_theta": 100_000.0, "rope_type": "default"},
    {"rope_theta": 10_000.0, "rope_type": "linear", "factor": 4.0},
    {"rope_theta": 500_000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
])
def test_rope_frequencies_equal_hf(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"},
                                          rope_parameters=dict(rope)))
    ours = ModelConfig.from_dict({**BASE, "rope_parameters": rope})
    assert hf.attention_scaling == 1.0
    assert torch.allclose(ours.inverse_frequencies(), hf.inv_freq.float(), rtol=1e-6)


def test_older_config_keys_and_sliding_window():
    older = ModelConfig.from_dict({**BASE, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert older.rope_theta == 1e6 and older.rope_scaling == {"type": "linear", "factor": 2.0}
    mistral = ModelConfig.from_dict({**BASE, "model_type": "mistral", "sliding_window": 1024})
    assert mistral.max_position_embeddings == 1024, "served context stops at the window"
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}).inverse_frequencies()
    with pytest.raises(ValueError, match="gemma"):
        ModelConfig.from_dict({**BASE, "model_type": "gemma"})


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL.exists(), reason=f"embedded model not prepared at {REAL_MODEL} (make setup)")
def test_greedy_tokens_equal_hf_on_the_embedded_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REAL_MODEL)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colors."}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
    del model
    engine = Engine.from_pretrained(REAL_MODEL, kv_cache_bytes=64 * 2**20, tokenizer=tokenizer)
    output = engine.generate([prompt], [None], SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert output.token_ids == expected, (tokenizer.decode(output.token_ids), tokenizer.decode(expected))
    assert output.finish_reason == ("stop" if len(expected) < 24 else "length")
    assert len(expected) >= 8, "a real answer, not an immediate EOS"
