"""The recipe that builds review-gpt, run for a few steps."""

from tuneoff.models.load import REVIEW_GPT_DIR, load_model_and_tokenizer


def test_review_gpt_recipe_runs_a_few_steps(tmp_path):
    from tuneoff.tasks.review_gpt import build

    card = build(tmp_path / "work", steps=2, export=tmp_path / "export")
    assert card["tokens_seen"] == 2 * 32 * 128 and card["held_out_perplexity"] > 0
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "export"))
    assert model.config.n_layer == 4 and len(tokenizer) == 4096
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (REVIEW_GPT_DIR / "tokenizer.json").read_bytes()
