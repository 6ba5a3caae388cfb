"""The judges that score responses, behind one interface: ``score(prompts, responses) -> Tensor`` (B,).

- :class:`GoldScorer`: the gold judge (:mod:`tuneoff.feedback.gold`) as a reward, the logit of P(positive) of
  :func:`judge_text`; the oracle of the default task.
- :class:`RewardScorer`: a reward model trained by ``tuneoff rm`` (:mod:`tuneoff.models.heads`), loaded back by
  :func:`load_reward_model`; it reads the prompt and the response tokenized exactly as in training.

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
        from tuneoff.data.grouped import fit_left, pad_right
        from tuneoff.models.heads import encode_response

        if isinstance(prompts, str) or isinstance(responses, str):
            raise TypeError("score takes a list of prompts and a list of responses, got a string")
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [fit_left(encode_response(self.tokenizer, p, r)[0], self.max_length) for p, r in zip(prompts, responses)]
        rewards = [
            self.score_ids(*pad_right(rows[i : i + batch_size], self.tokenizer.pad_token_id))
            for i in range(0, len(rows), batch_size)
        ]
        out = torch.cat(rewards) if rewards else torch.zeros(0)  # (B,)
        if normalize:
            out = (out - self.info.get("reward_mean", 0.0)) / max(self.info.get("reward_std", 1.0), 1e-6)
        return out

    __call__ = score


def load_reward_model(folder: str | Path, device: str | torch.device = "cpu") -> RewardScorer:
    """The reward model saved by ``tuneoff rm`` in ``folder`` (``runs/NAME/model``) as a :class:`RewardScorer`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneoff.models.heads import FORMAT_VERSION, HEAD_FILE, INFO_FILE, RewardModel
    from tuneoff.models.load import fuse_activations

    folder = Path(folder)
    for name in ("config.json", HEAD_FILE, INFO_FILE):
        if not (folder / name).exists():
            raise TuneoffError(f"{folder} is not a reward model folder: {name} is missing")
    info = json.loads((folder / INFO_FILE).read_text())
    if info.get("format") != FORMAT_VERSION:
        raise TuneoffError(f"{folder}: reward model format {info.get('format')!r}, this tuneoff reads {FORMAT_VERSION}")
    lm = fuse_activations(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = RewardModel(lm, pooling=info.get("pooling", "last"))
    model.load_head(folder)
    return RewardScorer(model, tokenizer, info, device)


def load_scorer(spec: str, device: str | torch.device = "cpu"):
    """``gold`` (the gold judge; oracle; a CPU model whatever the device) or the folder of a reward model trained by
    ``tuneoff rm``, on ``device``."""
    if spec == "gold":
        return GoldScorer()
    if not spec:
        raise TuneoffError("no reward given: pass --reward-model FOLDER (from `tuneoff rm`) or --reward-model gold")
    return load_reward_model(spec, device)
