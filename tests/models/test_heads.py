"""The scalar reward head: last-token gather (left and right padding), padding invariance, save and load."""

import pytest
import torch

from tuneoff.data.grouped import pad_right
from tuneoff.errors import TuneoffError
from tuneoff.feedback.judges import load_reward_model
from tuneoff.models.heads import (
    RewardModel,
    encode_response,
    gather_last,
    last_token_index,
    masked_mean_pool,
    position_ids_from_mask,
    save_reward_model,
)


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(left).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="without any real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_gather_last_hand_computed():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # hidden[b, t] = 12b + 3t + (0, 1, 2)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])  # row 0 right-padded (last real t = 1), row 1 left-padded (t = 3)
    assert gather_last(hidden, mask).tolist() == [[3.0, 4.0, 5.0], [21.0, 22.0, 23.0]]


def test_masked_mean_pool_hand_computed():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # hidden[b, t] = 12b + 3t + (0, 1, 2)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    # row 0: mean of t = 0, 1 -> (0 + 3) / 2 = 1.5 (+ 0, 1, 2); row 1: mean of t = 1, 2, 3 -> 12 + 6 = 18 (+ 0, 1, 2)
    assert masked_mean_pool(hidden, mask).tolist() == [[1.5, 2.5, 3.5], [18.0, 19.0, 20.0]]


def test_mean_pooled_reward_ignores_padding_and_survives_save_and_load(tmp_path, tiny_tokenizer):
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = RewardModel(load_model("tiny"), pooling="mean").eval()
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    alone = torch.cat([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences])
    ids, mask = pad_right(sequences, pad_id=1)
    left_ids = torch.stack([torch.cat([torch.full((6 - len(s),), 1), torch.tensor(s)]) for s in sequences])
    left_mask = (left_ids != 1).long()
    assert torch.allclose(model(ids, mask), alone, atol=1e-5) and torch.allclose(
        model(left_ids, left_mask), alone, atol=1e-5
    )
    scorer = load_reward_model(save_reward_model(tmp_path / "rm", model, tiny_tokenizer, {"max_length": 32}))
    assert scorer.model.pooling == "mean"
    assert torch.allclose(scorer.score_ids(ids, mask), alone, atol=1e-5)
    with pytest.raises(TuneoffError, match="pooling must be one of last, mean"):
        RewardModel(load_model("tiny"), pooling="max")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_forward_equals_padded_forward(pooling):
    """Pairs packed with their shared prefix once (rejected's tail blind to chosen's) give the padded batch's
    rewards."""
    from tuneoff.data.grouped import pair_pack
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = RewardModel(load_model("tiny"), pooling=pooling).eval()
    chosen = [[5, 6, 7, 8, 9], [11, 12]]
    rejected = [[5, 6, 7, 20], [11, 12, 21, 22]]  # prefixes [5, 6, 7] and [11] (12 is chosen's last: its own)
    batch = pair_pack(chosen, rejected, pad_id=1, width=8)
    # groups [5 6 7 8 9 20] (6 tokens) and [11 12 12 21 22] (5): first-fit decreasing into rows of 8, one per row
    assert batch["packed_ids"].tolist() == [[5, 6, 7, 8, 9, 20, 0, 0], [11, 12, 12, 21, 22, 0, 0, 0]]
    assert batch["packed_positions"][:, :6].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 3, 0]]
    mask = batch["packed_mask"][0, 0].int().tolist()
    assert mask[5] == [1, 1, 1, 0, 0, 1, 0, 0]  # rejected's 20 sees the prompt 5 6 7 and itself, not 8 9
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # chosen's 9: plain causal
    assert mask[7] == [0, 0, 0, 0, 0, 0, 0, 1]  # filler sees itself only
    assert batch["token_index"].tolist() == [0, 1, 2, 3, 4, 8, 9, 0, 1, 2, 5, 8, 10, 11, 12]
    assert batch["segments"].tolist() == [0] * 5 + [1] * 2 + [2] * 4 + [3] * 4
    rows = chosen + rejected
    packed = model.forward_packed(
        batch["packed_ids"],
        batch["packed_positions"],
        batch["token_index"],
        batch["segments"],
        len(rows),
        batch["packed_mask"],
    )
    assert torch.allclose(packed, model(*pad_right(rows, pad_id=1)), atol=1e-5)
    wide = pair_pack(chosen, rejected, pad_id=1, width=32)  # both groups in one row, filler at its end
    assert wide["packed_ids"].shape == (1, 32)
    assert torch.allclose(
        model.forward_packed(
            wide["packed_ids"], wide["packed_positions"], wide["token_index"], wide["segments"], 4, wide["packed_mask"]
        ),
        packed,
        atol=1e-5,
    )


def test_packed_pairs_on_a_llama_backbone():
    """SmolLM2 (Llama: rotary positions, its own mask path) reads the shared-prefix layout the same way."""
    from tuneoff.data.grouped import pair_pack
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = RewardModel(load_model("smollm2-135m"), pooling="last").eval()
    chosen, rejected = [[5, 6, 7, 8, 9], [11, 12]], [[5, 6, 7, 20], [11, 12, 21, 22]]
    batch = pair_pack(chosen, rejected, pad_id=2)
    with torch.no_grad():
        packed = model.forward_packed(
            batch["packed_ids"],
            batch["packed_positions"],
            batch["token_index"],
            batch["segments"],
            4,
            batch["packed_mask"],
        )
        padded = model(*pad_right(chosen + rejected, pad_id=2))
    assert torch.allclose(packed, padded, atol=1e-4)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_group_of_three_responses_packs_its_prompt_once(pooling):
    """K responses of one prompt: the prefix once, then each tail, every tail blind to the others' tails."""
    from tuneoff.data.grouped import pack
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = RewardModel(load_model("tiny"), pooling=pooling).eval()
    sequences = [[5, 6, 7, 8], [5, 6, 9], [5, 6, 7, 10, 11], [30, 31]]  # 0-2 share the prompt [5, 6]; 3 alone
    batch = pack(sequences, [[0, 1, 2], [3]], pad_id=1, width=12)
    # run [5 6 | 7 8 | 9 | 7 10 11] (8 tokens) and [30 31] (2): both fit one row of 12
    assert batch["packed_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10, 11, 30, 31, 0, 0]]
    assert batch["packed_positions"][0, :10].tolist() == [0, 1, 2, 3, 2, 2, 3, 4, 0, 1]
    mask = batch["packed_mask"][0, 0].int().tolist()
    assert mask[4] == [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # 9 sees the prompt and itself only
    assert mask[7] == [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]  # 11: the prompt, then its own 7 10
    assert mask[9] == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]  # the lone sequence: plain causal within itself
    assert batch["token_index"].tolist() == [0, 1, 2, 3, 0, 1, 4, 0, 1, 5, 6, 7, 8, 9]
    assert batch["segments"].tolist() == [0] * 4 + [1] * 3 + [2] * 5 + [3] * 2
    packed = model.forward_packed(
        batch["packed_ids"], batch["packed_positions"], batch["token_index"], batch["segments"], 4, batch["packed_mask"]
    )
    assert torch.allclose(packed, model(*pad_right(sequences, pad_id=1)), atol=1e-5)


def test_a_group_sharing_nothing_packs_as_singletons():
    """Three responses whose prompts were cut from the left share no token: three runs, not one long one."""
    from tuneoff.data.grouped import pack

    batch = pack([[1, 2], [3, 4], [5, 6]], [[0, 1, 2]], pad_id=9, width=4)
    assert batch["packed_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch["packed_positions"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    assert batch["packed_mask"][0, 0, 3].tolist() == [False, False, True, True]  # 4 sees 3, not the other run


def test_shared_prefix_leaves_each_sequence_a_token():
    from tuneoff.data.grouped import shared_prefix

    assert shared_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert shared_prefix([1, 2], [1, 2, 3]) == 1  # [1, 2] is all prefix: its last token stays its own
    assert shared_prefix([1, 2, 3], [1, 2, 3]) == 2
    assert shared_prefix([7], [7, 8]) == 0
    assert shared_prefix([1, 2], [3, 4]) == 0


def test_position_ids_from_mask():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]


@pytest.fixture(scope="module")
def tiny_reward_model():
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    return RewardModel(load_model("tiny")).eval()


def test_reward_does_not_depend_on_padding(tiny_reward_model):
    """The same sequences alone, right-padded and left-padded in one batch give the same rewards."""
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    alone = torch.cat(
        [tiny_reward_model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences]
    )
    ids, mask = pad_right(sequences, pad_id=1)
    right = tiny_reward_model(ids, mask)
    width = ids.shape[1]
    left_ids = torch.stack([torch.cat([torch.full((width - len(s),), 1), torch.tensor(s)]) for s in sequences])
    left_mask = torch.stack([torch.cat([torch.zeros(width - len(s)), torch.ones(len(s))]).long() for s in sequences])
    left = tiny_reward_model(left_ids, left_mask)
    assert right.shape == (3,)
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)


def test_pad_token_equal_to_eos_is_not_mistaken_for_padding(tiny_reward_model):
    """SmolLM2 pads with its EOS: a response ending in EOS followed by pads of the same id reads the EOS position."""
    eos = 0
    sequence = [5, 6, 7, eos]
    alone = tiny_reward_model(torch.tensor([sequence]), torch.ones(1, 4, dtype=torch.long))
    ids, mask = pad_right([sequence, [8, 9, 10, 11, 12, 13, 14]], pad_id=eos)
    assert ids[0].tolist() == [5, 6, 7, eos, eos, eos, eos]
    assert torch.allclose(tiny_reward_model(ids, mask)[0], alone[0], atol=1e-5)


def test_encode_response_string_and_messages(tiny_tokenizer):
    from tuneoff.data.formats import Message
    from tuneoff.data.pairs import encode

    ids, n = encode_response(tiny_tokenizer, "the movie is", " great fun")
    prompt = tiny_tokenizer("the movie is", add_special_tokens=False)["input_ids"]
    response = tiny_tokenizer(" great fun", add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    assert ids == prompt + response + [eos] and n == len(response)
    # an empty prompt: BOS (or EOS), a context for the first response token, as the RM trains on
    start = tiny_tokenizer.bos_token_id if tiny_tokenizer.bos_token_id is not None else eos
    assert encode_response(tiny_tokenizer, "", " great fun") == ([start, *response, eos], len(response))

    conversation = (Message("user", "hi"),)
    ids, n = encode_response(tiny_tokenizer, conversation, "hello there")
    assert tiny_tokenizer.decode(ids).endswith("hello there<|im_end|>\n") and 0 < n < len(ids)
    prompt_ids, response_ids = encode(tiny_tokenizer, conversation, "hello there")
    assert ids == prompt_ids + response_ids and n == len(response_ids) - 1  # the ids the RM trains on, as DPO's


def test_save_and_load_back_as_scorer(tmp_path, tiny_tokenizer, tiny_reward_model):
    torch.manual_seed(1)
    torch.nn.init.normal_(tiny_reward_model.head.weight)
    folder = save_reward_model(
        tmp_path / "rm", tiny_reward_model, tiny_tokenizer, {"max_length": 64, "reward_mean": 1.0, "reward_std": 2.0}
    )
    assert (folder / "reward_head.safetensors").exists() and (folder / "model.safetensors").exists()
    scorer = load_reward_model(folder)
    prompts, responses = ["the movie is", "a film"], [" great fun", " that never ends , and it is dull"]
    rewards = scorer.score(prompts, responses)
    rows = [encode_response(tiny_tokenizer, p, r)[0] for p, r in zip(prompts, responses)]
    with torch.no_grad():
        expected = tiny_reward_model(*pad_right(rows, tiny_tokenizer.pad_token_id))
    assert rewards.shape == (2,) and torch.allclose(rewards, expected, atol=1e-5)
    assert torch.allclose(scorer.score(prompts, responses, normalize=True), (expected - 1.0) / 2.0, atol=1e-5)
    assert torch.allclose(scorer.score(prompts, responses, batch_size=1), expected, atol=1e-5)


def test_lora_trains_the_head_too():
    from tuneoff.models.load import apply_lora, load_model

    model = RewardModel(apply_lora(load_model("tiny"), r=2, alpha=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert any("lora_" in name for name in trainable)
    assert all("lora_" in name or name.startswith("head.") for name in trainable)


def test_untied_lm_head_is_frozen():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, tie_word_embeddings=False))
    RewardModel(lm)  # freezes the LM's untied output head, which a reward model never uses
    assert not lm.lm_head.weight.requires_grad and lm.transformer.wte.weight.requires_grad


def transformers_rewards(folder, rows: list[list[int]]) -> torch.Tensor:
    """Rewards of token-id rows from the folder loaded as transformers' sequence classifier, right-padded with the
    pad id its config names (what a user of the exported model does)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids, mask = pad_right(rows, model.config.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_a_saved_reward_model_loads_as_a_transformers_sequence_classifier(tmp_path, tiny_tokenizer, pad_is_eos):
    """save_reward_model's folder loads with AutoModelForSequenceClassification and gives tuneoff's rewards (1e-5),
    also where the tokenizer pads with EOS (SmolLM2): the export names another special token as pad."""
    import copy
    import json

    from tuneoff.models.load import load_model

    torch.manual_seed(3)
    model = RewardModel(load_model("tiny")).eval()
    torch.nn.init.normal_(model.head.weight)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    folder = save_reward_model(tmp_path / "rm", model, tokenizer, {"max_length": 64})
    info = json.loads((folder / "reward_model.json").read_text())
    assert info["transformers"] == {"exported": True, "pad_token": "<|pad|>"}
    prompts, responses = ["the movie is", "a film", "so"], [" great fun", " that never ends , and it is dull", " bad"]
    rows = [encode_response(tokenizer, p, r)[0] for p, r in zip(prompts, responses)]
    assert all(row[-1] == tokenizer.eos_token_id for row in rows)  # read at EOS, even where EOS is the pad
    expected = load_reward_model(folder).score(prompts, responses)
    with torch.no_grad():
        direct = model(*pad_right(rows, tokenizer.pad_token_id))
    torch.testing.assert_close(expected, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(transformers_rewards(folder, rows), expected, atol=1e-5, rtol=0)


def test_heads_that_cannot_export_say_why_and_still_load(tmp_path, tiny_tokenizer):
    import json

    from tuneoff.models.load import load_model

    mean = RewardModel(load_model("tiny"), pooling="mean").eval()
    folder = save_reward_model(tmp_path / "mean", mean, tiny_tokenizer, {"max_length": 64})
    assert json.loads((folder / "reward_model.json").read_text())["transformers"] == {
        "exported": False,
        "reason": "mean pooling: transformers' sequence classifiers read the last token only",
    }
    biased = RewardModel(load_model("tiny")).eval()
    torch.nn.init.constant_(biased.head.bias, 0.5)
    folder = save_reward_model(tmp_path / "bias", biased, tiny_tokenizer, {"max_length": 64})
    assert "bias" in json.loads((folder / "reward_model.json").read_text())["transformers"]["reason"]
    assert load_reward_model(folder).score(["a"], [" b"]).shape == (1,)


def test_a_folder_saved_before_the_export_still_loads(tmp_path, tiny_tokenizer, tiny_reward_model):
    """Folders of earlier versions (no score.weight, no `transformers` entry) load as before."""
    import json

    from safetensors.torch import load_file, save_file

    folder = save_reward_model(tmp_path / "rm", tiny_reward_model, tiny_tokenizer, {"max_length": 64})
    expected = load_reward_model(folder).score(["the movie is"], [" great fun"])
    tensors = load_file(folder / "model.safetensors")
    del tensors["score.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = config["architectures"][:1]
    (folder / "config.json").write_text(json.dumps(config))
    info = json.loads((folder / "reward_model.json").read_text())
    del info["transformers"]
    (folder / "reward_model.json").write_text(json.dumps(info))
    torch.testing.assert_close(load_reward_model(folder).score(["the movie is"], [" great fun"]), expected)
