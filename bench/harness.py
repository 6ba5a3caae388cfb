"""What a benchmark child measures, the same way for tuneoff and TRL: step times, tokens, episodes, rewards.

Nothing here knows which framework runs. Two process-wide hooks see what both do:
- a global optimizer-step post-hook stamps the time after every ``optimizer.step()`` (accelerate's wrapper calls
  the torch optimizer underneath, so it fires for both); ``steps_per_unit`` optimizer steps make one unit (an
  SFT/RM/DPO step, a GRPO iteration, a PPO iteration of 4 epochs);
- the decoder classes' ``forward`` is wrapped (at class level, so reference models, critics and copies made by
  either framework are counted too) to add up the real tokens of every decoder call, split by whether autograd
  was on (a training forward, followed by a backward) or off (generation, reference and value passes).
The timed window runs from the end of unit 1 (the warm-up: allocator, lazy init, first-batch tokenization) to the
end of the last unit, so model loading, data preparation and a one-off reference pass never count.
"""

from __future__ import annotations

import functools
import time

import torch

COUNTERS = ("train_tokens", "infer_tokens", "episodes", "new_tokens")


class Meter:
    def __init__(self, steps_per_unit: int = 1):
        self.steps_per_unit, self.optimizer_steps = steps_per_unit, 0
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.marks: list[tuple[float, dict]] = []  # (time, counters) at the end of each unit
        self.rewards: list[float] = []
        self.losses: list[float] = []
        self.n_params = 0
        self.lora = False

    # ------------------------------------------------------------ installing the hooks

    def install(self) -> "Meter":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(self._after_optimizer_step)
        for cls in decoder_classes():
            cls.forward = self._counting(cls.forward)
        self._count_lean_paths()
        return self

    def _count_lean_paths(self) -> None:
        """tuneoff's lean GPT-2 and Llama-family paths do the decoder's work without calling it: count their tokens
        the same way (packed passes: every slot; prefill: the real prompt tokens; a decode step: one token per row)."""
        from tuneoff.models import gpt2_decode, llama_decode

        counts = self.counts

        def add(tokens: int) -> None:
            counts["train_tokens" if torch.is_grad_enabled() else "infer_tokens"] += int(tokens)

        def count(module, decoder_class) -> None:
            packed, prefill, step = module.packed_hidden_states, decoder_class.prefill, decoder_class.step

            def counted_packed(model, input_ids, position_ids):
                add(input_ids.numel())
                return packed(model, input_ids, position_ids)

            def counted_prefill(decoder, prompt_ids, positions):
                add(decoder.allowed[..., : prompt_ids.shape[1]].sum())
                return prefill(decoder, prompt_ids, positions)

            def counted_step(decoder, token, position):
                add(token.numel())
                return step(decoder, token, position)

            module.packed_hidden_states = counted_packed
            decoder_class.prefill, decoder_class.step = counted_prefill, counted_step

        count(gpt2_decode, gpt2_decode.GPT2Decoder)
        count(llama_decode, llama_decode.LlamaDecoder)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.optimizer_steps += 1
        if self.optimizer_steps % self.steps_per_unit == 0:
            self.mark()

    def mark(self) -> None:
        """End of a unit: its time (after the GPU's queued work, where there is one) and the counters so far."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), dict(self.counts)))

    def _counting(self, forward):
        meter = self

        @functools.wraps(forward)
        def counted(module, *args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                mask = kwargs.get("attention_mask")
                # With a KV cache the mask spans past + new tokens: only the new ones are computed.
                real = int(mask.sum()) if mask is not None and mask.shape == ids.shape else ids.numel()
                if torch.is_grad_enabled():
                    meter.counts["train_tokens"] += real
                else:
                    meter.counts["infer_tokens"] += real
            return forward(module, *args, **kwargs)

        return counted

    # ------------------------------------------------------------ what the framework adapters report

    def add_episodes(self, episodes: int, new_tokens: int) -> None:
        self.counts["episodes"] += int(episodes)
        self.counts["new_tokens"] += int(new_tokens)

    def add_rewards(self, rewards) -> None:
        self.rewards += [float(r) for r in rewards]

    def describe_model(self, model, lora: bool) -> None:
        """N for the FLOP estimate: every parameter of the base model once (a tied embedding once)."""
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        self.lora = lora

    def watch_gold_judge(self) -> None:
        """Record every reward the gold judge hands out (tuneoff's GoldScorer, used by both frameworks)."""
        from tuneoff.feedback import judges

        score = judges.GoldScorer.score

        def recorded(scorer, prompts, responses):
            rewards = score(scorer, prompts, responses)
            self.add_rewards(rewards.tolist())
            return rewards

        judges.GoldScorer.score = recorded

    # ------------------------------------------------------------ the result

    def summary(self) -> dict:
        """Counters inside the timed window (units 2..N) and its length; the losses and rewards as recorded."""
        if len(self.marks) < 2:
            raise RuntimeError(
                f"only {len(self.marks)} units finished: need a warm-up unit and at least one timed unit"
            )
        (t0, first), (t1, last) = self.marks[0], self.marks[-1]
        return {
            "timed_units": len(self.marks) - 1,
            "time_s": t1 - t0,
            **{k: last[k] - first[k] for k in COUNTERS},
            "losses": self.losses,
            "rewards": self.rewards,
            "n_params": self.n_params,
            "lora": self.lora,
        }


def decoder_classes() -> list[type]:
    """The decoder stacks of the models benchmarked (review-gpt is GPT-2, SmolLM2 is Llama)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model
    from transformers.models.llama.modeling_llama import LlamaModel

    return [GPT2Model, LlamaModel]
