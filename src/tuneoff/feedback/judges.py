"""The judges that score responses, behind one interface: ``score(prompts, responses) -> Tensor`` (B,).

- :class:`GoldScorer`: the gold judge (:mod:`tuneoff.feedback.gold`) as a reward, the logit of P(positive) of
  :func:`judge_text`; the oracle of the default task.
- :class:`RewardScorer`: a reward model trained by ``tuneoff rm`` (:mod:`tuneoff.models.heads`), loaded back by
  :func:`load_reward_model`; it reads the prompt and the response tokenized exactly as in training.
- :class:`SequenceClassifierScorer`: any Hugging Face sequence classifier with one label (what TRL's
  ``RewardTrainer`` saves; the public reward models), reading text as TRL formats reward data.

:func:`load_scorer` picks one from a ``--reward-model`` value. :func:`judge_text` is the one text a judge that
reads plain text (the gold judge, simulated annotators) sees for a (prompt, response).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from tuneoff.errors import TuneoffError


def judge_text(prompt, response: str) -> str:
    """The text a judge reads for one (prompt, response): the whole text, prompt then response.

    A plain prompt is the start of a text and the response its continuation as decoded, leading space included:
    the default task's prompts are the first words of an SST-2 sentence, the SST-2 SFT records' completions start
    with their space, and the gold judge was trained on whole sentences. So the two are joined as they are (a space
    added in between would split a word the response completes). A conversation (messages with a ``content``)
    reads as its turns' contents, then the response, one space apart.
    """
    if isinstance(prompt, str):
        return prompt + response
    return " ".join([m["content"] if isinstance(m, dict) else m.content for m in prompt] + [response])


class GoldScorer:
    """The gold judge as a reward (oracle runs): the logit of P(positive) of :func:`judge_text`."""

    def __init__(self):
        from tuneoff.feedback.gold import load_gold_judge

        self.judge = load_gold_judge()

    def score(self, prompts: Sequence, responses: Sequence[str]) -> torch.Tensor:
        """Logits (B,) float32 on CPU."""
        texts = [judge_text(p, r) for p, r in zip(prompts, responses)]
        return torch.tensor(self.judge.logit(texts), dtype=torch.float32)


class RewardScorer:
    """A trained reward model ready to score text (or token ids) in inference mode."""

    def __init__(self, model, tokenizer, info: dict, device: str | torch.device = "cpu"):
        self.model, self.tokenizer, self.info = model.eval().to(device), tokenizer, info
        self.device = torch.device(device)
        self.max_length = int(info.get("max_length", 512))

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def encode(self, prompt, response: str) -> list[int]:
        """The token ids this model reads for one (prompt, response): exactly those it trained on, its last
        ``max_length``."""
        from tuneoff.data.grouped import fit_left
        from tuneoff.models.heads import encode_response

        return fit_left(encode_response(self.tokenizer, prompt, response)[0], self.max_length)

    @torch.inference_mode()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of token ids (B, T) padded on either side; for RL loops that hold ids already."""
        return self.model(input_ids.to(self.device), attention_mask.to(self.device)).cpu()

    @torch.inference_mode()
    def score(
        self, prompts: Sequence, responses: Sequence[str], batch_size: int = 32, normalize: bool = False
    ) -> torch.Tensor:
        """r(x, y) for each (prompt, response), tokenized exactly as in training: (B,) float32 on CPU.

        normalize: subtract the mean and divide by the std of the rewards of held-out responses at the end
        of training (``reward_mean``/``reward_std`` in ``reward_model.json``), so 0 is a typical response.
        """
        from tuneoff.data.grouped import pad_right

        if isinstance(prompts, str) or isinstance(responses, str):
            raise TypeError("score takes a list of prompts and a list of responses, got a string")
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [self.encode(p, r) for p, r in zip(prompts, responses)]
        rewards = [
            self.score_ids(*pad_right(rows[i : i + batch_size], self.pad_id)) for i in range(0, len(rows), batch_size)
        ]
        out = torch.cat(rewards) if rewards else torch.zeros(0)  # (B,)
        if normalize:
            out = (out - self.info.get("reward_mean", 0.0)) / max(self.info.get("reward_std", 1.0), 1e-6)
        return out

    __call__ = score


class SequenceClassifierScorer(RewardScorer):
    """A Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels == 1`` as a reward: its logit.

    Text is formatted the way TRL's ``RewardTrainer`` formats reward data, so a model TRL trained scores what it
    was trained on: a conversation (a prompt of messages) with the response as the next assistant turn through the
    tokenizer's chat template; a plain prompt as ``prompt + response`` with EOS appended (unless already there),
    tokenized with the tokenizer's special tokens. Rows keep their last ``max_length`` tokens, are right-padded with
    the config's pad id (the tokenizer's pad, else EOS, where the config has none: TRL's choice) and the model reads
    the last token that is not the pad, as transformers does. Scoring is :meth:`RewardScorer.score`'s; such a
    model carries no held-out reward statistics, so ``normalize`` changes nothing."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", max_length: int = 1024):
        super().__init__(model, tokenizer, {"max_length": max_length}, device)
        config = model.config.get_text_config()
        if config.pad_token_id is None:
            config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )

    @property
    def pad_id(self) -> int:
        return self.model.config.get_text_config().pad_token_id

    def encode(self, prompt, response: str) -> list[int]:
        """The token ids this model reads for one (prompt, response)."""
        if isinstance(prompt, str):
            eos = self.tokenizer.eos_token or ""
            text = prompt + response
            return self.tokenizer(text if text.endswith(eos) else text + eos)["input_ids"][-self.max_length :]
        if not getattr(self.tokenizer, "chat_template", None):
            raise TuneoffError("this reward model's tokenizer has no chat template: score string prompts instead")
        turns = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in prompt]
        ids = self.tokenizer.apply_chat_template(
            turns + [{"role": "assistant", "content": response}], tokenize=True, return_dict=True
        )["input_ids"]
        return list(ids)[-self.max_length :]

    @torch.inference_mode()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of right-padded token ids (B, T), padded with ``pad_id``."""
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
        return logits[:, 0].float().cpu()


def reward_model_kind(folder: str | Path) -> str:
    """``tuneoff`` (a folder written by ``tuneoff rm``), ``classifier`` (a Hugging Face sequence classifier with
    one label), or a TuneoffError that says what the folder lacks."""
    from tuneoff.models.heads import HEAD_FILE, INFO_FILE

    folder = Path(folder)
    if not (folder / "config.json").exists():
        hint = " (a LoRA adapter: merge it into its base first)" if (folder / "adapter_config.json").exists() else ""
        raise TuneoffError(f"{folder} is not a reward model folder: config.json is missing{hint}")
    if (folder / INFO_FILE).exists():
        if not (folder / HEAD_FILE).exists():
            raise TuneoffError(f"{folder} is not a reward model folder: {HEAD_FILE} is missing")
        return "tuneoff"
    config = json.loads((folder / "config.json").read_text())
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise TuneoffError(
            f"{folder} is neither a tuneoff reward model ({INFO_FILE} is missing) nor a Hugging Face sequence "
            "classifier (config.json names no *ForSequenceClassification architecture)"
        )
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise TuneoffError(f"{folder}: a classifier with {labels} labels is not a reward model (needs num_labels 1)")
    return "classifier"


def load_reward_model(
    folder: str | Path, device: str | torch.device = "cpu"
) -> RewardScorer | SequenceClassifierScorer:
    """The reward model in ``folder``: one saved by ``tuneoff rm`` (``runs/NAME/model``) as a :class:`RewardScorer`,
    or any Hugging Face sequence classifier with one label as a :class:`SequenceClassifierScorer`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tuneoff.models.heads import FORMAT_VERSION, INFO_FILE, RewardModel
    from tuneoff.models.load import fuse_activations

    folder = Path(folder)
    if reward_model_kind(folder) == "classifier":
        from transformers import AutoModelForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        return SequenceClassifierScorer(model, tokenizer, device)
    info = json.loads((folder / INFO_FILE).read_text())
    if info.get("format") != FORMAT_VERSION:
        raise TuneoffError(f"{folder}: reward model format {info.get('format')!r}, this tuneoff reads {FORMAT_VERSION}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the exported score.weight is not the causal LM's: expected, not news
    try:
        lm = fuse_activations(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = RewardModel(lm, pooling=info.get("pooling", "last"))
    model.load_head(folder)
    return RewardScorer(model, tokenizer, info, device)


def load_scorer(spec: str, device: str | torch.device = "cpu"):
    """``gold`` (the gold judge; oracle; a CPU model whatever the device) or the folder of a reward model (trained by
    ``tuneoff rm``, or any Hugging Face sequence classifier with one label), on ``device``."""
    if spec == "gold":
        return GoldScorer()
    if not spec:
        raise TuneoffError(
            "no reward given: pass --reward-model FOLDER (from `tuneoff rm`, or a Hugging Face reward model) or "
            "--reward-model gold"
        )
    return load_reward_model(spec, device)
