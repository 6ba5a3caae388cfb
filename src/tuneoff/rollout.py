"""Batched sampling with a KV cache: token ids, per-token log-probs under the sampling policy, and masks.

One prefill over the left-padded prompts, then one forward per new token that feeds only the new tokens and
reuses the cache. Plain GPT-2 and Llama-family models (SmolLM2, Qwen2, Llama 3) take tuneoff's lean decode steps,
:mod:`tuneoff.models.gpt2_decode` and :mod:`tuneoff.models.llama_decode` (the same math without transformers'
per-call work); other models take transformers' forward. The loop
does nothing else per step: no logits processors, no stopping-criteria objects,
and the LM head only on the last position. A sequence stops at its first EOS; the EOS is part of the
response (it carries the reward in PPO) and everything after it is masked. Sequences that reach
``max_new_tokens`` without EOS have ``ended = False``: the trainers decide (penalty or mask).

Log-probs are those of the distribution sampled from, ``log_softmax(logits / temperature)`` before top-p
truncation (as TRL and OpenRLHF do), so PPO's recomputed log-probs use the same temperature.

:func:`sample_responses` runs :func:`generate` over batches of prompts and decodes the responses: the sampler
that evaluation and the layers above use to draw text from a policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from tuneoff.models import gpt2_decode, llama_decode


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response_ids: torch.Tensor  # (B, R) pad after the end
    response_mask: torch.Tensor  # (B, R) 1 on generated tokens up to and including EOS
    logprobs: torch.Tensor  # (B, R) log π(y_t | x, y_<t) of the sampled tokens, 0 where masked
    ended: torch.Tensor  # (B,) True where the sequence emitted EOS

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.response_mask.sum(-1)

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and response joined: ids and attention mask, (B, P + R)."""
        return torch.cat([self.prompt_ids, self.response_ids], 1), torch.cat([self.prompt_mask, self.response_mask], 1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> left-padded ids and mask, (B, P_max)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
    return ids, mask


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator=None, rows: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> sampled token (B,) and its log-prob under softmax(logits / T) (B,). T = 0 is greedy.
    ``rows`` = (offset, total): these are rows offset … offset + B of a batch of ``total`` (see :func:`generate`)."""
    if temperature == 0:
        token = logits.argmax(-1)  # (B,)
        return token, torch.zeros_like(token, dtype=logits.dtype)
    logits = logits.float()
    logprobs = torch.log_softmax(logits if temperature == 1 else logits / temperature, -1)  # (B, V)
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set with mass >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    token = sample_categorical(probs, generator, rows)  # (B,)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def sample_categorical(probs: torch.Tensor, generator=None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One draw per row of (B, V) non-negative weights, by inverting the CDF: the first index whose cumulative
    weight exceeds u · total, u ~ U[0, 1). Exact, and B random numbers instead of torch.multinomial's B · V
    exponentials (0.03 ms instead of 0.57 ms at B = 8, V = 4,096 on this CPU). A zero-weight index is never drawn:
    its cumulative weight equals its predecessor's, so no u falls in its interval. With ``rows`` = (offset, total)
    the generator draws ``total`` numbers and these rows take theirs, so a batch split across processes draws
    what it would draw whole."""
    B = probs.shape[0]
    offset, total = rows or (0, B)
    cdf = probs.double().cumsum(-1)  # (B, V); float64 so that the last entries of a 50k vocabulary stay distinct
    u = torch.rand((total, 1), generator=generator, dtype=torch.float64, device=probs.device)[offset : offset + B]
    u = u * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)  # (B,)


def cache_argument(model) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``; use whichever this model's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class LeanPath(NamedTuple):
    module: object
    """gpt2_decode or llama_decode: ``supports(model)`` and ``packed_hidden_states``."""
    decoder: type
    family: str


LEAN_PATHS = (
    LeanPath(gpt2_decode, gpt2_decode.GPT2Decoder, "GPT-2"),
    LeanPath(llama_decode, llama_decode.LlamaDecoder, "Llama-family"),
)


def lean_path(model) -> LeanPath | None:
    """tuneoff's lean path that reproduces this model exactly (decode, prefill, packed passes), or None where only
    transformers' forward is exact (other architectures, adapters it cannot reproduce, live dropout, sliding
    windows: each module's ``supports``). The one place that decides, for sampling and for the RL passes."""
    if not whole_parameters(model):
        return None
    return next((path for path in LEAN_PATHS if path.module.supports(model)), None)


def whole_parameters(model) -> bool:
    """Every parameter a plain, non-empty tensor on this process: the lean paths read the weights themselves, which
    FSDP (sharded DTensors, or flat parameters whose views are empty outside its forward) does not allow. DDP and
    DeepSpeed ZeRO-1/2 keep whole weights on every process."""
    from torch.distributed.tensor import DTensor

    return all(p.numel() > 0 and not isinstance(p, DTensor) for p in model.parameters())


def lean_decoder(model, prompt_mask: torch.Tensor, max_new_tokens: int):
    """The lean decode state for the model's family (prefill, step), or None (:func:`lean_path`)."""
    path = lean_path(model)
    return path.decoder(model, prompt_mask, max_new_tokens) if path else None


def decode_path(model) -> str:
    """Which decode path :func:`generate` takes for this model, in words (logged by the RL loops, so a run never
    falls back to the slow path silently)."""
    path = lean_path(model)
    if path is None:
        return f"transformers' forward ({type(model).__name__}: no lean path reproduces it exactly)"
    return f"tuneoff's lean {path.family} decode" + (" (with LoRA)" if hasattr(model, "peft_config") else "")


@torch.inference_mode()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator=None,
    rows: tuple[int, int] | None = None,
) -> Rollout:
    """Sample up to ``max_new_tokens`` per prompt with a KV cache; see the module docstring.

    ``rows`` = (offset, total) says that these prompts are rows offset … offset + B of a batch of ``total`` that
    other processes sample the rest of, from generators in the same state: each step draws ``total`` numbers and
    uses its rows', so the tokens do not depend on how the batch is split (only on the rows' own logits)."""
    from transformers import DynamicCache

    B, device = prompt_ids.shape[0], prompt_ids.device
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding does not shift positions
    lean = lean_decoder(model, prompt_mask, max_new_tokens)
    if lean is not None:  # the same math as transformers' forward, without its per-call overhead
        logits = lean.prefill(prompt_ids, position_ids)  # (B, V)
    else:
        cache = {cache_argument(model): DynamicCache()}
        logits = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **cache,
        ).logits[:, -1]  # (B, V)
    mask = prompt_mask
    next_position = position_ids[:, -1:] + 1  # (B, 1)
    tokens, logprobs = [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        token, logprob = sample_token(logits, temperature, top_p, generator, rows)  # (B,), (B,)
        token = torch.where(alive, token, torch.full_like(token, pad_token_id))
        tokens.append(token)
        logprobs.append(torch.where(alive, logprob, torch.zeros_like(logprob)))
        alive = alive & (token != eos_token_id)
        if not alive.any():
            break
        if lean is not None:
            logits = lean.step(token, next_position[:, 0])
        else:
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], 1)
            logits = model(
                input_ids=token[:, None], attention_mask=mask, position_ids=next_position, use_cache=True, **cache
            ).logits[:, -1]
        next_position = next_position + 1
    response_ids = torch.stack(tokens, 1)  # (B, R)
    is_eos = response_ids == eos_token_id
    ended = is_eos.any(-1)
    # 1 up to and including the first EOS; all ones for sequences that never ended
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # (B, R)
    response_mask = (~after_eos).long()
    return Rollout(
        prompt_ids, prompt_mask, response_ids, response_mask, torch.stack(logprobs, 1) * response_mask, ended
    )


@torch.inference_mode()
def sample_responses(
    model,
    tokenizer,
    ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    generator,
    batch: int = 64,
    top_p: float = 1.0,
):
    """Sampled responses to prompt token ids (:func:`generate`), ``batch`` prompts per call, on the model's device.

    Returns (response token ids without EOS, decoded texts without special tokens, per batch the (full ids, full
    mask, prompt width, response mask) that :func:`tuneoff.eval.alignment.exact_kl_per_token` reads).
    """
    tokens, texts, batches = [], [], []
    device = next(model.parameters()).device
    for i in range(0, len(ids), batch):
        prompt_ids, prompt_mask = (t.to(device) for t in left_pad(ids[i : i + batch], tokenizer.pad_token_id))
        r = generate(
            model,
            prompt_ids,
            prompt_mask,
            max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            temperature,
            top_p,
            generator=generator,
        )
        rows = [row[m.bool()].tolist() for row, m in zip(r.response_ids.cpu(), r.response_mask.cpu())]
        ends = [row[:-1] if ended and row else row for row, ended in zip(rows, r.ended.tolist())]  # EOS is not text
        tokens += ends
        texts += tokenizer.batch_decode(ends, skip_special_tokens=True)
        batches.append((*r.full(), prompt_ids.shape[1], r.response_mask))
    return tokens, texts, batches
