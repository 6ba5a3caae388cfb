"""Scalar reward model: a causal LM's decoder plus a linear head read at the last real token (or, with
``pooling="mean"``, on the mean hidden state of the real tokens).

r(x, y) = w · h_T + b, where h_T is the decoder's last hidden state at the last token of prompt x followed by
response y (and EOS). The last token is found from the attention mask, never by searching for pad ids:
SmolLM2's pad token *is* its EOS, so the first pad id can be the response's own end. Both left and right
padding work, and position ids are rebuilt from the mask, so a sequence gets the same reward whatever its
padding (transformers' plain forward numbers positions from 0 at the first column, pads included).

On disk a reward model is a folder: the backbone as a Hugging Face causal-LM folder (safetensors, tokenizer;
LoRA merged), the head in ``reward_head.safetensors`` (``weight`` (1, H), ``bias`` (1,)) and
``reward_model.json`` (format, max_length, the reward mean/std over held-out responses, eval metrics).
:func:`tuneoff.feedback.judges.load_reward_model` loads one back as a scorer.

The same folder loads elsewhere as ``AutoModelForSequenceClassification.from_pretrained(folder)`` with the same
rewards (:func:`transformers_export`): ``model.safetensors`` also holds the head as ``score.weight`` and
``config.json`` says one label. transformers reads the reward at the last token that is not the pad id, tuneoff at
the last token of the attention mask; where the pad token is EOS (SmolLM2), the folder's tokenizer and config
get another special token as pad, one that never occurs in what the model reads, so the two agree. Heads with
mean pooling, or a bias (the Bradley–Terry loss never moves it from 0, so tuneoff's own never have one), do not
export: ``reward_model.json`` says why under ``transformers``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tuneoff.errors import TuneoffError
from tuneoff.models import gpt2_last_block

HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "reward_model.json"
FORMAT_VERSION = 1


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1 in each row: (B, T) -> (B,) long.

    Right padding [1 1 1 0 0] -> 2; left padding [0 0 1 1 1] -> 4; no padding -> T − 1.
    A row without any real token is an error (it has no reward to read).
    """
    mask = attention_mask.bool()
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("attention_mask has a row without any real token")
    width = mask.shape[-1]
    return width - 1 - mask.flip(-1).int().argmax(dim=-1)  # (B,) argmax finds the first 1 of the flipped row


def gather_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state at each row's last real token: (B, T, H), (B, T) -> (B, H)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask).to(hidden.device)]  # (B, H)


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean hidden state over each row's real tokens: (B, T, H), (B, T) -> (B, H)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)


POOLINGS = {"last": gather_last, "mean": masked_mean_pool}
"""Where the head reads the sequence: the last real token (InstructGPT, TRL) or the mean over real tokens."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens, whatever the padding side; pads get 0: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0: r_w and r_l must come from the same function in one step."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class RewardModel(torch.nn.Module):
    """A causal LM (optionally LoRA-wrapped by peft) whose decoder feeds a scalar head.

    The head lives outside peft, so it always trains, with or without LoRA. The LM head (vocabulary
    projection) is never used; when it is not tied to the embeddings it is frozen so DDP sees no unused
    trainable parameter.
    """

    def __init__(self, lm, head: torch.nn.Linear | None = None, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise TuneoffError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.model, self.pooling = lm, pooling
        hidden = lm.config.get_text_config().hidden_size
        if head is None:
            head = torch.nn.Linear(hidden, 1)
            # std 1/sqrt(H + 1), as OpenAI's lm-human-preferences initialises its reward head.
            torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
            torch.nn.init.zeros_(head.bias)
        self.head = head
        output, embeddings = lm.get_output_embeddings(), lm.get_input_embeddings()
        if output is not None and output.weight is not embeddings.weight:
            output.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of (B, T) token ids, padded on either side."""
        decoder = self.model.get_decoder()
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,  # (B, T, H)
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return self.head(POOLINGS[self.pooling](hidden, attention_mask)).squeeze(-1).float()  # (B,)

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_index: torch.Tensor,
        segments: torch.Tensor,
        count: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards (count,) of sequences packed into rows without padding between them.

        input_ids, position_ids (R, W). Without ``attention_mask``, positions restart at 0 for each sequence, which
        transformers turns into a block-diagonal causal mask; with it, (R, 1, W, W) bool says which key each query
        sees (so sequences may share a packed prefix). A row's unused tail is filler. token_index (N,): the flat
        position (in R·W) of every token of every sequence, in sequence order (shared positions repeat);
        segments (N,): its sequence. Equal to :meth:`forward` on the padded batch (tested)."""
        if self.pooling == "last":
            ends = token_index[
                torch.cat(
                    [(segments[1:] != segments[:-1]).nonzero().squeeze(-1), segments.new_tensor([len(segments) - 1])]
                )
            ]  # (count,) flat position of each last token
            if attention_mask is not None and gpt2_last_block.supports(self.model):
                return (
                    self.head(gpt2_last_block.at_positions(self.model, input_ids, position_ids, attention_mask, ends))
                    .squeeze(-1)
                    .float()
                )
        decoder = self.model.get_decoder()
        hidden = decoder(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,  # (R, W, H)
            use_cache=False,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (R·W, H)
        if self.pooling == "last":
            pooled = hidden.index_select(0, ends)  # index_select: its backward (index_add) is fast on a CPU
        else:
            hidden = hidden.index_select(0, token_index)  # (N, H) every sequence's tokens, sequence after sequence
            sums = hidden.new_zeros((count, hidden.shape[-1])).index_add_(0, segments, hidden)  # (count, H)
            pooled = sums / torch.bincount(segments, minlength=count).clamp(min=1)[:, None].to(hidden.dtype)
        return self.head(pooled).squeeze(-1).float()  # (count,)

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        """Checkpoint form (what ``train.common.save_checkpoint`` calls): backbone or LoRA adapter + head."""
        self.model.save_pretrained(folder, safe_serialization=safe_serialization)
        save_head(self.head, Path(folder))

    def load_head(self, folder) -> None:
        from safetensors.torch import load_file

        path = Path(folder) / HEAD_FILE
        if not path.exists():
            raise TuneoffError(f"{folder} holds no {HEAD_FILE}: not a reward model")
        self.head.load_state_dict(load_file(path))


def save_head(head: torch.nn.Linear, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, folder / HEAD_FILE)


def save_reward_model(folder: str | Path, model: RewardModel, tokenizer, info: dict) -> Path:
    """The final form: a plain HF folder (LoRA merged) + head + ``reward_model.json`` (``info`` added), which also
    loads as a transformers sequence classifier where the head allows (:func:`transformers_export`)."""
    import copy

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    lm = model.model
    if hasattr(lm, "peft_config"):
        lm = copy.deepcopy(lm).merge_and_unload()
    pad_id, reason = transformers_export(model, tokenizer)
    state = lm.state_dict()  # views of the weights: no copy
    if reason is None:
        state["score.weight"] = model.head.weight.detach()  # (1, H): transformers' sequence-classifier head
    lm.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_head(model.head, folder)
    if reason is None:
        exported = {"exported": True, "pad_token": mark_sequence_classifier(folder, tokenizer, pad_id)}
    else:
        exported = {"exported": False, "reason": reason}
    info = {"format": FORMAT_VERSION, "pooling": model.pooling, **info, "transformers": exported}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))
    return folder


def export_pad_id(tokenizer) -> int | None:
    """A pad id for transformers' sequence classifier, which reads the last token that is not the pad: the
    tokenizer's pad where it is not EOS (EOS closes every response tuneoff scores), else its unknown token or
    another special (added) token that is neither EOS nor BOS and not written by the chat template; None if none."""
    template = getattr(tokenizer, "chat_template", None) or ""
    closing = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    added = [i for i, token in sorted(tokenizer.added_tokens_decoder.items()) if token.special]
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, *tokenizer.all_special_ids, *added]
    for token_id in candidates:
        if token_id is None or token_id in closing:
            continue
        if tokenizer.convert_ids_to_tokens(token_id) in template:
            continue
        return token_id
    return None


def transformers_export(model: RewardModel, tokenizer) -> tuple[int | None, str | None]:
    """(pad id, None) where the reward model can also be a transformers sequence classifier with the same rewards,
    else (None, why not)."""
    if model.pooling != "last":
        return None, f"{model.pooling} pooling: transformers' sequence classifiers read the last token only"
    if model.head.bias is not None and float(model.head.bias.detach().abs().max()) != 0.0:
        return None, "the head has a bias; transformers' sequence classifiers have none"
    pad_id = export_pad_id(tokenizer)
    if pad_id is None:
        return None, "no special token can serve as pad without being read as the last token"
    return pad_id, None


def mark_sequence_classifier(folder: Path, tokenizer, pad_id: int) -> str:
    """``config.json``: one label, the pad id, the sequence-classifier architecture beside the causal LM's; the
    tokenizer saved with that pad. Returns the pad token."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    causal = config.get("architectures") or []
    classifier = [a.replace("ForCausalLM", "ForSequenceClassification") for a in causal]
    classifier = [a.replace("LMHeadModel", "ForSequenceClassification") for a in classifier]
    config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad_id)
    config["architectures"] = causal + [a for a in classifier if a not in causal]
    config_file.write_text(json.dumps(config, indent=2))
    pad = tokenizer.convert_ids_to_tokens(pad_id)
    if tokenizer.pad_token_id != pad_id:
        import copy

        exported = copy.deepcopy(tokenizer)
        exported.pad_token = pad
        exported.save_pretrained(folder)
    return pad


# ---------------------------------------------------------------- text -> token ids (training and scoring alike)


def encode_response(tokenizer, prompt, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response, exactly those the reward model trains on (before
    :func:`tuneoff.data.grouped.fit_left`), and the response's length in tokens as the length-bias probe counts
    it (its closing EOS or end of turn excluded).

    Both come from :func:`tuneoff.data.pairs.encode`: a string prompt and the response are tokenized separately
    (the ids a policy sees when it writes the response) and EOS is appended, so the reward is read at EOS; an
    empty prompt becomes BOS (or EOS, without one). A messages prompt (a tuple of objects with
    ``role``/``content``): the conversation with the response as the next assistant turn, rendered by the chat
    template (its end-of-turn token closes the response).
    """
    from tuneoff.data.pairs import encode, response_length

    prompt_ids, response_ids = encode(tokenizer, prompt, response)
    return prompt_ids + response_ids, response_length(response_ids)
