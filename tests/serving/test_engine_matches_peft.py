"""The engine's tokens and logits equal HF transformers + PEFT, adapter by adapter, in one mixed batch."""

from __future__ import annotations

import pytest
import torch

from longtail.serving.engine import Engine
from longtail.serving.errors import UnknownAdapter
from longtail.serving.sampling import SamplingParams

NEW_TOKENS = 32


def hf_greedy(base_dir, adapter_dir, prompt, new_tokens=NEW_TOKENS):
    """Reference: HF model (+ PEFT adapter), greedy, returning tokens and the logits of each step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt])
    tokens, logits, past = [], [], None
    with torch.inference_mode():
        for _ in range(new_tokens):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            step = result.logits[0, -1].float()
            token = int(step.argmax())
            tokens.append(token)
            logits.append(step)
            ids = torch.tensor([[token]])
    return tokens, torch.stack(logits)


def prompts_for(kit, vocab=384):
    generator = torch.Generator().manual_seed(7)
    names = [*kit.adapter_dirs, None]
    lengths = [5, 11, 3, 17, 8]
    return [(name, torch.randint(3, vocab, (length,), generator=generator).tolist())
            for name, length in zip(names, lengths, strict=True)]


@pytest.mark.parametrize("kit_name", ["tiny_llama", "tiny_qwen2", "sharp_llama", "sharp_qwen2"])
def test_mixed_batch_matches_peft_for_every_adapter(kit_name, request):
    kit = request.getfixturevalue(kit_name)
    engine = Engine.from_pretrained(kit.base_dir, kv_cache_bytes=8 * 2**20)
    ids = {name: engine.add_adapter(path) for name, path in kit.adapter_dirs.items()}
    jobs = prompts_for(kit)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True)
    outputs = engine.generate([p for _, p in jobs], [ids[n] if n else None for n, _ in jobs], params)
    for (name, prompt), output in zip(jobs, outputs, strict=True):
        expected, expected_logits = hf_greedy(kit.base_dir, kit.adapter_dirs.get(name), prompt)
        assert output.token_ids == expected, f"{kit_name} adapter {name}"
        logprobs = torch.log_softmax(expected_logits, -1)[torch.arange(NEW_TOKENS), torch.tensor(expected)]
        assert torch.allclose(torch.tensor(output.logprobs), logprobs, atol=1e-4), name


def test_logits_within_tolerance_of_peft(tiny_llama):
    engine = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=8 * 2**20)
    adapter = engine.add_adapter(tiny_llama.adapter_dirs["r64-qko"])
    prompt = [5, 9, 33, 2, 71, 100]
    captured = []
    original = engine.model.forward

    def spy(plan, cache, lora):
        logits = original(plan, cache, lora)
        captured.append(logits.clone())
        return logits

    engine.model.forward = spy
    engine.generate([prompt], [adapter], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    _, expected = hf_greedy(tiny_llama.base_dir, tiny_llama.adapter_dirs["r64-qko"], prompt, 4)
    got = torch.cat(captured)
    assert (got - expected).abs().max() < 1e-4


def test_requests_joining_and_cancelled_mid_decode_change_no_other_tokens(sharp_llama):
    engine = Engine.from_pretrained(sharp_llama.base_dir, kv_cache_bytes=8 * 2**20)
    a = engine.add_adapter(sharp_llama.adapter_dirs["r8-all"])
    b = engine.add_adapter(sharp_llama.adapter_dirs["r16-mlp-rslora"])
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
    alone = engine.generate([[4, 5, 6, 7]], [a], params)[0]
    late_alone = engine.generate([[1, 2, 3, 4, 5, 6]], [b], params)[0]

    main = engine.submit([4, 5, 6, 7], a, params)
    doomed = engine.submit([9, 9, 9, 40, 41, 42, 43, 44], b, params)
    for _ in range(5):
        engine.step()
    doomed.cancel()
    late = engine.submit([1, 2, 3, 4, 5, 6], b, params)
    while not (main.done.is_set() and late.done.is_set() and doomed.done.is_set()):
        engine.step()
    for got, expected in ((main.output(), alone), (late.output(), late_alone)):
        assert got.token_ids == expected.token_ids
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(expected.logprobs), atol=1e-5)
    assert doomed.output().finish_reason == "cancelled"
    assert 0 < len(doomed.output().token_ids) < 20
    assert engine.cache.pool.free_blocks == engine.cache.pool.num_blocks, "every block returns to the pool"


def test_seeded_sampling_is_reproducible(tiny_llama):
    engine = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=8 * 2**20)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    first = engine.generate([[3, 4, 5]] * 2, [None, None], params)
    again = engine.generate([[3, 4, 5]], [None], params)
    other = engine.generate([[3, 4, 5]], [None], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert first[0].token_ids == first[1].token_ids == again[0].token_ids
    assert other[0].token_ids != first[0].token_ids


def test_bad_requests_fail_alone(tiny_llama):
    from longtail.serving.errors import InvalidSamplingParams, PromptTooLong

    engine = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=8 * 2**20)
    with pytest.raises(UnknownAdapter):
        engine.submit([1, 2], "0x" + "ab" * 32, SamplingParams())
    with pytest.raises(PromptTooLong):
        engine.submit([1] * 250, None, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidSamplingParams):
        engine.submit([1, 2], None, SamplingParams(max_tokens=0))
    assert engine.generate([[1, 2, 3]], [None], SamplingParams(max_tokens=3, temperature=0.0))[0].token_ids


def test_score_gives_the_logprobs_of_generation_and_of_the_base(tiny_llama):
    engine = Engine.from_pretrained(tiny_llama.base_dir, kv_cache_bytes=8 * 2**20)
    adapter = engine.add_adapter(tiny_llama.adapter_dirs["r8-all"])
    prompt = [4, 8, 15, 16, 23]
    output = engine.generate([prompt], [adapter], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                                 logprobs=True))[0]
    scored = engine.score(prompt, output.token_ids, adapter)
    assert torch.allclose(torch.tensor(scored), torch.tensor(output.logprobs), atol=1e-4)
    base = engine.score(prompt, output.token_ids, None)
    _, base_logits = hf_greedy(tiny_llama.base_dir, None, prompt, 1)
    assert abs(base[0] - float(torch.log_softmax(base_logits[0], -1)[output.token_ids[0]])) < 1e-4
    assert sum(scored) > sum(base), "greedy tokens of the adapter are likelier under the adapter"
    assert engine.cache.pool.free_blocks == engine.cache.pool.num_blocks
