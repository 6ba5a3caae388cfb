import gzip
import hashlib
import json
import math

import pytest
import torch

from tuneoff.errors import TuneoffError
from tuneoff.models.load import REVIEW_GPT_DIR, load_model, load_model_and_tokenizer, load_tokenizer


def test_tiny_is_small_random_and_dropout_free():
    torch.manual_seed(0)
    a = load_model("tiny")
    torch.manual_seed(0)
    b = load_model("tiny")
    assert sum(p.numel() for p in a.parameters()) < 500_000
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.resid_pdrop == 0.0


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(TuneoffError, match="unknown model 'nope'"):
        load_tokenizer("nope")
    with pytest.raises(TuneoffError, match="holds no weights"):
        (tmp_path / "config.json").write_text((REVIEW_GPT_DIR / "config.json").read_text())
        load_model(str(tmp_path))


def test_review_gpt_shipped_weights_write_reviews():
    """The committed fp16 weights load in float32 and model held-out SST-2 dev text far better than chance."""
    model, tokenizer = load_model_and_tokenizer("review-gpt")
    assert next(model.parameters()).dtype == torch.float32
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert (REVIEW_GPT_DIR / "model.safetensors").stat().st_size < 10 * 2**20
    with gzip.open(REVIEW_GPT_DIR.parent / "data" / "sst2" / "dev.tsv.gz", "rt") as f:
        sentences = [line.split("\t")[1].strip() for line in f][1:65]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    # Uniform guessing over 4,096 tokens is perplexity 4,096; the recipe recorded ≈ 147 on its held-out split.
    assert math.exp(loss) < 400, math.exp(loss)
    recipe = json.loads((REVIEW_GPT_DIR / "RECIPE.json").read_text())
    shipped = REVIEW_GPT_DIR.parent / "data" / "sst2" / "train.tsv.gz"
    assert recipe["data"]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_smollm2_from_gguf_converts_once_and_loads():
    pytest.importorskip("gguf")
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    assert abs(sum(p.numel() for p in model.parameters()) - 134_515_008) < 1_000_000
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(ids)


def test_fused_gelu_gives_the_same_logits_and_gradients_as_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    from tuneoff.models.load import load_model, resolve

    ours = load_model("review-gpt")
    plain = AutoModelForCausalLM.from_pretrained(resolve("review-gpt"), dtype=torch.float32)
    assert any(isinstance(m, torch.nn.GELU) for m in ours.modules())
    assert not any(type(m).__name__ == "NewGELUActivation" for m in ours.modules())
    ours.eval(), plain.eval()
    ids = torch.tensor([[5, 60, 700, 8, 90, 1000]])
    a, b = ours(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    a.sum().backward(), b.sum().backward()
    grad_ours = ours.transformer.h[0].mlp.c_fc.weight.grad
    grad_plain = plain.transformer.h[0].mlp.c_fc.weight.grad
    assert torch.allclose(grad_ours, grad_plain, atol=1e-4, rtol=1e-4)
