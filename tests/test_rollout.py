import torch

from tuneoff.rollout import generate, left_pad, sample_token


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sample_token_logprob_and_top_p():
    # probabilities (0.5, 0.3, 0.2): with top_p 0.6 only tokens 0 and 1 can be drawn.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(2000, 1)
    token, logprob = sample_token(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(token.tolist()) == {0, 1}
    assert torch.allclose(logprob, torch.log(torch.tensor([0.5, 0.3, 0.2]))[token])  # untruncated distribution
    share0 = (token == 0).float().mean().item()
    assert abs(share0 - 0.5 / 0.8) < 0.04  # renormalised over the kept mass
    greedy, _ = sample_token(logits[:1], temperature=0.0, top_p=1.0)
    assert greedy.item() == 0


def test_greedy_matches_transformers_generate():
    from tuneoff.models.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("review-gpt")
    model.eval()
    prompts = ["the film is", "a dull , lifeless", "i loved every minute of this"]
    ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], tokenizer.pad_token_id)
    ours = generate(
        model,
        ids,
        mask,
        max_new_tokens=20,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        temperature=0.0,
    )
    with torch.inference_mode():
        reference = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=20,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    reference = reference[:, ids.shape[1] :]
    width = min(reference.shape[1], ours.response_ids.shape[1])
    masked_ours = ours.response_ids.masked_fill(ours.response_mask == 0, tokenizer.pad_token_id)
    assert torch.equal(masked_ours[:, :width], reference[:, :width])


def test_masks_and_logprobs_match_a_full_forward():
    """Stops at EOS per sequence; post-EOS is masked; sampled log-probs equal a fresh full forward's."""
    from tuneoff.models.load import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("review-gpt")
    model.eval()
    prompts = ["the film is", "a dull , lifeless mess", "it 's a", "the acting"]
    ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], tokenizer.pad_token_id)
    r = generate(
        model,
        ids,
        mask,
        max_new_tokens=40,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        temperature=0.9,
        generator=torch.Generator().manual_seed(1),
    )
    for row in range(len(prompts)):
        n = int(r.response_mask[row].sum())
        tokens = r.response_ids[row, :n].tolist()
        assert (tokenizer.eos_token_id in tokens) == bool(r.ended[row])
        if r.ended[row]:
            assert tokens.index(tokenizer.eos_token_id) == n - 1
        assert (r.response_mask[row, n:] == 0).all() and (r.logprobs[row, n:] == 0).all()
    full_ids, full_mask = r.full()
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids).logits
    P = ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : -1] / 0.9, -1).gather(-1, r.response_ids[..., None]).squeeze(-1)
    assert torch.allclose(logp * r.response_mask, r.logprobs, atol=1e-4)


def test_sample_categorical_frequencies_and_zero_weights():
    from tuneoff.rollout import sample_categorical

    # weights 0.1, 0, 0.6, 0.3 (unnormalised ×2): 100k draws, frequencies within 4 standard errors (≤ 0.0062)
    probs = torch.tensor([[0.2, 0.0, 1.2, 0.6]]).repeat(100_000, 1)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    share = torch.bincount(draws, minlength=4).double() / len(draws)
    assert share[1] == 0 and torch.allclose(share, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64), atol=0.0062)
    one_hot = torch.zeros(3, 5)
    one_hot[torch.arange(3), torch.tensor([4, 0, 2])] = 1.0
    assert sample_categorical(one_hot).tolist() == [4, 0, 2]


def test_lean_gpt2_decode_equals_transformers_forward():
    """The same prompts, generator and model with the lean decode step and with transformers' forward: identical
    greedy tokens, and sampled log-probs within float error."""
    from unittest import mock

    from tuneoff.models import gpt2_decode
    from tuneoff.models.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("review-gpt")
    model.eval()
    assert gpt2_decode.supports(model)
    prompts = ["the film is", "a dull , lifeless mess of a", "it"]
    ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], tokenizer.pad_token_id)

    def run(temperature):
        return generate(
            model,
            ids,
            mask,
            24,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            temperature,
            generator=torch.Generator().manual_seed(3),
        )

    lean_greedy, lean_sampled = run(0.0), run(1.0)
    with mock.patch("tuneoff.rollout.lean_decoder", return_value=None):
        hf_greedy, hf_sampled = run(0.0), run(1.0)
    assert torch.equal(lean_greedy.response_ids, hf_greedy.response_ids)
    same = (lean_sampled.response_ids == hf_sampled.response_ids).all(-1)
    assert same.all(), "the same uniform draws on (nearly) the same distribution pick the same tokens"
    assert torch.allclose(lean_sampled.logprobs, hf_sampled.logprobs, atol=1e-4)


def test_lean_decode_is_not_used_where_it_would_differ():
    from tuneoff.models import gpt2_decode
    from tuneoff.models.load import apply_lora, load_model

    model = load_model("review-gpt")
    model.train()
    assert not gpt2_decode.supports(model)  # dropout 0.2 would fire in train mode
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert gpt2_decode.supports(model)  # the RL loops switch dropout off
    assert not gpt2_decode.supports(apply_lora(load_model("review-gpt")))  # adapters: transformers' forward


def test_rows_of_a_split_batch_draw_what_the_whole_batch_draws():
    """generate's ``rows``: a batch split in two halves, each from a generator in the same state, samples the
    tokens the whole batch samples (what keeps rollouts independent of the number of processes)."""
    from tuneoff.rollout import sample_categorical

    probs = torch.rand(6, 50, generator=torch.Generator().manual_seed(1))
    whole = sample_categorical(probs, torch.Generator().manual_seed(7))
    first = sample_categorical(probs[:2], torch.Generator().manual_seed(7), rows=(0, 6))
    rest = sample_categorical(probs[2:], torch.Generator().manual_seed(7), rows=(2, 6))
    assert torch.equal(torch.cat([first, rest]), whole)
    assert not torch.equal(sample_categorical(probs[2:], torch.Generator().manual_seed(7)), whole[2:])


def test_rollout_seed_depends_on_seed_and_step_in_the_bits_a_cpu_generator_keeps():
    from tuneoff.train.policy import rollout_seed

    seeds = {rollout_seed(seed, step) for seed in range(3) for step in range(3)}
    assert len({s & 0xFFFFFFFF for s in seeds}) == 9  # torch's CPU generator reads the low 32 bits only
    draw = lambda seed: torch.rand(4, generator=torch.Generator().manual_seed(rollout_seed(seed, 0)))  # noqa: E731
    assert not torch.equal(draw(0), draw(1)) and torch.equal(draw(0), draw(0))
    assert 0 <= min(seeds) and max(seeds) < 2**63
