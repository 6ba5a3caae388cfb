import pytest
import torch

from tuneoff.data.grouped import pad_right
from tuneoff.models import gpt2_last_block
from tuneoff.models.heads import RewardModel, disable_dropout


@pytest.mark.parametrize("name", ["tiny", "review-gpt"])
def test_last_block_at_positions_equals_the_full_forward(name):
    """Hidden states (after ln_f) at chosen positions, and the gradients through them, match transformers' forward."""
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = load_model(name)
    disable_dropout(model)
    assert gpt2_last_block.supports(model)
    ids = torch.randint(2, 200, (3, 10))
    positions = torch.arange(10).repeat(3, 1)
    mask = torch.ones((10, 10), dtype=torch.bool).tril().expand(3, 1, 10, 10)
    read = torch.tensor([9, 13, 20, 29])  # flat positions in the (3, 10) rows
    full = model.transformer(
        input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False
    ).last_hidden_state
    expected = full.reshape(-1, full.shape[-1])[read]
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got = gpt2_last_block.at_positions(model, ids, positions, mask, read)
    assert torch.allclose(got, expected, atol=1e-5)
    (got * weights).sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-5, rtol=1e-4), n
    assert len(model.transformer.h) == model.config.n_layer  # the trunk is restored


def test_reward_model_takes_the_short_path_only_when_it_is_exact(monkeypatch):
    """Last-token pooling of a plain GPT-2 uses it; mean pooling, live dropout and LoRA take the full forward."""
    from tuneoff.data.grouped import pair_pack
    from tuneoff.models.load import apply_lora, load_model

    calls = []
    original = gpt2_last_block.at_positions
    monkeypatch.setattr(gpt2_last_block, "at_positions", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    chosen, rejected = [[5, 6, 7, 8], [9, 10]], [[5, 6, 11], [9, 12, 13]]
    batch = pair_pack(chosen, rejected, pad_id=1)
    args = (
        batch["packed_ids"],
        batch["packed_positions"],
        batch["token_index"],
        batch["segments"],
        4,
        batch["packed_mask"],
    )
    plain = RewardModel(load_model("tiny"), pooling="last").eval()
    assert torch.allclose(plain.forward_packed(*args), plain(*pad_right(chosen + rejected, pad_id=1)), atol=1e-5)
    assert calls == [1]
    RewardModel(load_model("tiny"), pooling="mean").eval().forward_packed(*args)
    lora = RewardModel(apply_lora(load_model("tiny"), 4, 8, 0.0, "all-linear"), pooling="last").eval()
    assert torch.allclose(lora.forward_packed(*args), lora(*pad_right(chosen + rejected, pad_id=1)), atol=1e-5)
    assert calls == [1]
