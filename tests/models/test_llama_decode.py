"""tuneoff's lean Llama-family paths against transformers' forward, on tiny seeded models shaped like SmolLM2
(tied embeddings, 3 query heads per key/value head), Qwen2 (qkv bias), Llama 3 (untied, llama3 rope scaling),
Llama with attention and MLP biases, Llama with dynamic rope scaling (frequencies that change with the length seen),
and Mistral without a sliding window."""

from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tuneoff.models import llama_decode
from tuneoff.rollout import cache_argument, generate, lean_decoder, left_pad

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=3, max_position_embeddings=256, pad_token_id=0)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so the scaling bends frequencies the prompts reach
}


def build(kind: str, **overrides):
    """A tiny random model of one family, weights, biases and norm gains drawn at a scale that gives O(1) logits."""
    shapes = {
        "smollm2": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                    intermediate_size=160, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, tie_word_embeddings=False, rope_theta=1000000.0)),
        "llama3": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
        "llama-biases": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, attention_bias=True, mlp_bias=True)),
        "llama-dynamic": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=8,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})),  # prompts and steps pass 8
        "mistral": (MistralConfig, MistralForCausalLM, dict(hidden_size=64, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, sliding_window=None)),
    }  # fmt: skip
    config_class, model_class, fields = shapes[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**{**SMALL, **fields, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def build_lora(kind: str):
    """A tiny model of one family wrapped by peft with LoRA r=4 on every linear layer (tuneoff's apply_lora), its
    adapters drawn at random (peft starts B at 0, which would hide them) and dropout off, in eval mode."""
    from tuneoff.models.heads import disable_dropout
    from tuneoff.models.load import apply_lora

    model = apply_lora(build(kind), r=4, alpha=8)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    disable_dropout(model)
    return model.eval()


def make(kind: str):
    return build_lora(kind.removesuffix("+lora")) if kind.endswith("+lora") else build(kind)


KINDS = ["smollm2", "qwen2", "llama3", "llama-biases", "llama-dynamic", "mistral", "smollm2+lora", "qwen2+lora"]


def prompts(lengths=(5, 7, 2, 1)):
    """Left-padded prompts, by default of unequal lengths (one without padding, one of a single token): ids and
    mask (B, max length)."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    return left_pad(rows, pad_id=0)


@pytest.mark.parametrize(
    "kind, lengths", [(kind, (5, 7, 2, 1)) for kind in KINDS] + [("smollm2-eager", (5, 7, 2, 1)), ("smollm2", (4, 4))]
)
def test_prefill_and_steps_equal_transformers_forward(kind, lengths):
    """Logits of the prefill and of six steps, on left-padded prompts (and on unpadded ones: no mask at all)."""
    from transformers import DynamicCache

    model = make(kind.removesuffix("-eager"))
    if kind.endswith("-eager"):
        model.set_attn_implementation("eager")
    assert llama_decode.supports(model)
    hf = llama_decode.unwrapped(model)  # transformers' forward, through the LoRA layers peft injected
    assert kind != "llama3" or model.model.rotary_emb.rope_type == "llama3"
    ids, mask = prompts(lengths)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = 6
    tokens = torch.randint(1, VOCAB, (steps, ids.shape[0]), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        lean = llama_decode.LlamaDecoder(model, mask, steps)
        got = [lean.prefill(ids, positions)]
        cache = {cache_argument(hf): DynamicCache()}
        out = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
        expected = [out.logits[:, -1]]
        for i, token in enumerate(tokens):
            position = positions[:, -1] + 1 + i
            got.append(lean.step(token, position))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = hf(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], **cache)
            expected.append(out.logits[:, -1])
    got, expected = torch.stack(got), torch.stack(expected)  # (1 + steps, B, V)
    assert expected.abs().max() > 1  # logits large enough for the tolerance to mean something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def run_generate(model, temperature, lean: bool):
    ids, mask = prompts()
    run = lambda: generate(  # noqa: E731
        model, ids, mask, 16, VOCAB - 1, 0, temperature, generator=torch.Generator().manual_seed(3)
    )
    if lean:
        assert isinstance(lean_decoder(model, mask, 16), llama_decode.LlamaDecoder)
        return run()
    with mock.patch("tuneoff.rollout.lean_decoder", return_value=None):
        return run()


@pytest.mark.parametrize("kind", KINDS)
def test_generate_greedy_and_sampled_equal_the_transformers_path(kind):
    """The same prompts and generator through the lean path and through transformers' forward: identical greedy
    tokens; sampled, the same uniform draws on (nearly) the same distribution pick the same tokens."""
    model = make(kind)
    for temperature in (0.0, 1.0):
        lean, hf = run_generate(model, temperature, True), run_generate(model, temperature, False)
        assert torch.equal(lean.response_ids, hf.response_ids)
        assert torch.equal(lean.response_mask, hf.response_mask)
        torch.testing.assert_close(lean.logprobs, hf.logprobs, atol=1e-5, rtol=0)
    assert lean.response_ids.unique().numel() > 5  # sampling went somewhere: the test compared real choices


@pytest.mark.parametrize("kind", KINDS)
def test_packed_hidden_states_equal_unpacked_forward_with_gradients(kind):
    """Three sequences packed into two rows (positions restarting at 0, filler continuing the last): hidden states
    and parameter gradients equal those of transformers' forward over each sequence alone (with LoRA: the
    adapters' gradients, the base being frozen)."""
    model = make(kind)
    g = torch.Generator().manual_seed(4)
    sequences = [torch.randint(1, VOCAB, (n,), generator=g) for n in (5, 3, 6)]
    ids = torch.stack([torch.cat(sequences[:2]), torch.cat([sequences[2], torch.tensor([0, 0])])])  # (2, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    spans = [(0, 0, 5), (0, 5, 8), (1, 0, 6)]  # (row, start, end) of each sequence
    weights = [torch.randn(e - s, model.config.hidden_size, generator=g) for _, s, e in spans]

    decoder = llama_decode.unwrapped(model).model
    expected = [decoder(input_ids=q[None], use_cache=False).last_hidden_state[0] for q in sequences]
    sum(((h * w).sum() for h, w in zip(expected, weights))).backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    hidden = llama_decode.packed_hidden_states(model, ids, positions)  # (2, 8, C)
    got = [hidden[r, s:e] for r, s, e in spans]
    sum(((h * w).sum() for h, w in zip(got, weights))).backward()
    for h, e in zip(got, expected):
        torch.testing.assert_close(h, e, atol=1e-5, rtol=0)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(expected_grads)  # all but lm_head
    for name, p in model.named_parameters():
        if name not in expected_grads:
            continue
        assert p.grad.abs().sum() > 0, name
        # float32 rounding relative to the gradient's scale (about 100 for the embeddings here); transformers'
        # own packed forward differs from its unpacked one by as much
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(
            p.grad, expected_grads[name], atol=1e-5 * scale, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_response_logprobs_take_the_lean_path_with_the_same_result():
    from tuneoff.train.policy import response_logprobs

    model = build("smollm2")
    rollout = run_generate(model, 1.0, True)
    full_ids, full_mask = rollout.full()
    args = (model, full_ids, full_mask, rollout.prompt_ids.shape[1], rollout.response_mask, 1.0)
    with mock.patch.object(llama_decode, "packed_hidden_states", wraps=llama_decode.packed_hidden_states) as lean:
        logp, _ = response_logprobs(*args)
    assert lean.called
    with mock.patch.object(llama_decode, "supports", return_value=False):
        expected, _ = response_logprobs(*args)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logp, rollout.logprobs, atol=1e-5, rtol=0)  # what the sampler reported


def test_lean_paths_are_not_used_where_they_would_differ():
    from peft import LoraConfig, inject_adapter_in_model

    from tuneoff.models.load import apply_lora

    lora = apply_lora(build("smollm2"), r=4, alpha=8)
    assert llama_decode.supports(lora.eval())  # LoRA on linear layers: reproduced
    assert not llama_decode.supports(lora.train())  # ... but not with its dropout live (0.05 here)
    injected = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), build("qwen2"))
    assert not llama_decode.supports(injected.eval())  # DoRA's magnitude vector is not reproduced
    embedding = inject_adapter_in_model(LoraConfig(r=4, target_modules=["embed_tokens"]), build("qwen2"))
    assert not llama_decode.supports(embedding.eval())  # nor an adapted embedding

    dropout = build("llama3", attention_dropout=0.1)
    assert llama_decode.supports(dropout)  # eval: dropout off
    assert not llama_decode.supports(dropout.train())
    assert llama_decode.supports(build("llama3").train())  # training mode without dropout is the same math

    assert not llama_decode.supports(build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1))
    assert not llama_decode.supports(build("mistral", sliding_window=4))
    assert not llama_decode.supports(build("smollm2", hidden_act="gelu"))
    assert not llama_decode.supports(torch.nn.Linear(2, 2))


def test_lean_paths_are_off_where_fsdp_shards_the_weights():
    """FSDP leaves each process a shard (a DTensor under FSDP2, an empty view outside forward under FSDP1): the lean
    paths read whole weights, so lean_path says None and the loops take transformers' forward."""
    from tuneoff.rollout import decode_path, lean_path

    model = build("smollm2")
    assert lean_path(model) is not None
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.data = torch.empty(0)  # what FSDP1 leaves outside its forward
    assert lean_path(model) is None and "transformers' forward" in decode_path(model)


def test_lora_adapters_count_and_switch_off_as_in_peft():
    """The lean step reads peft's switches: with ``disable_adapter()`` (π_ref under LoRA) it gives the base
    model's logits, with the adapters on it gives others (the adapters are not negligible here)."""
    model = build_lora("smollm2")
    base = build("smollm2")  # the same seeded weights without adapters
    ids, mask = prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        adapted = llama_decode.LlamaDecoder(model, mask, 1).prefill(ids, positions)
        with model.disable_adapter():
            off = llama_decode.LlamaDecoder(model, mask, 1).prefill(ids, positions)
            token = off.argmax(-1)
            decoder = llama_decode.LlamaDecoder(model, mask, 1)
            decoder.prefill(ids, positions)
            off_step = decoder.step(token, positions[:, -1] + 1)
        plain = llama_decode.LlamaDecoder(base, mask, 1)
        expected = plain.prefill(ids, positions)
        expected_step = plain.step(token, positions[:, -1] + 1)
    torch.testing.assert_close(off, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(off_step, expected_step, atol=1e-6, rtol=0)
    assert (adapted - expected).abs().max() > 0.1


def test_merged_or_prompt_learning_adapters_take_transformers_path():
    from peft import PromptTuningConfig, get_peft_model

    merged = build_lora("smollm2")
    merged.merge_adapter()
    assert not llama_decode.supports(merged)  # peft unmerges on disable_adapter(); the lean step would not
    prompt = get_peft_model(build("smollm2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not llama_decode.supports(prompt.eval())  # virtual tokens live outside the layers
