"""A lean decode step for GPT-2 models (review-gpt, tiny): the same math as transformers' GPT-2, fewer operations.

Why: on a CPU, one decode step of a 4-layer GPT-2 at batch 8 costs about 3 ms in transformers' forward, most of
it per-call work (mask construction, cache objects, module hooks, output dataclasses) rather than arithmetic.
This step reads the same weights (no copy, so it always sees the current policy), keeps keys and values in one
preallocated buffer per layer (B, H, T, D), and runs 13 tensor operations per layer. The prompt is encoded the
same way, all its positions at once (the prefill), straight into the buffers.

Used by :func:`tuneoff.rollout.generate` when :func:`supports` says the model is a plain GPT-2 (no adapters, no
active dropout, the default attention scaling); everything else takes transformers' forward. Parity with it is
tested on logits and on greedy output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(model) -> bool:
    """A GPT2LMHeadModel in the configuration this step reproduces, with no dropout that could fire."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "GPT2LMHeadModel" or config is None:
        return False
    plain = (
        config.activation_function == "gelu_new"
        and config.scale_attn_weights
        and not config.scale_attn_by_inverse_layer_idx
        and not config.reorder_and_upcast_attn
    )
    dropout_live = model.training and any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    return bool(plain) and not dropout_live


def block_forward(
    block, x: torch.Tensor, mask: torch.Tensor, heads: int, eps: float, kv: torch.Tensor | None = None
) -> torch.Tensor:
    """One GPT-2 block over whole sequences: x (B, T, C), mask (B, 1, T, T) bool (True: the query sees the key)
    -> (B, T, C). Writes the keys and values into ``kv`` (2, B, H, T, D) when given."""
    B, T, C = x.shape
    attn, mlp = block.attn, block.mlp
    h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, eps)
    qkv = torch.addmm(attn.c_attn.bias, h.view(B * T, C), attn.c_attn.weight).view(B, T, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
    if kv is not None:
        kv[0], kv[1] = k, v
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B * T, C)  # (B·T, C)
    x = torch.addmm(attn.c_proj.bias, a, attn.c_proj.weight).view(B, T, C) + x
    h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, eps).view(B * T, C)
    h = F.gelu(torch.addmm(mlp.c_fc.bias, h, mlp.c_fc.weight), approximate="tanh")  # gelu_new
    return torch.addmm(mlp.c_proj.bias, h, mlp.c_proj.weight).view(B, T, C) + x


def packed_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after ln_f) of padding-free packed rows (R, W), positions restarting at 0 for each
    sequence (filler continuing the last one): what ``model.transformer(input_ids=, position_ids=)`` returns,
    without its per-call work. Autograd flows through it as through the module."""
    transformer, config = model.transformer, model.config
    R, W = input_ids.shape
    segment = (position_ids == 0).cumsum(-1)  # (R, W) which sequence of its row each position belongs to
    causal = torch.ones((W, W), dtype=torch.bool, device=input_ids.device).tril()
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # (R, 1, W, W)
    x = transformer.wte(input_ids) + transformer.wpe(position_ids)  # (R, W, C)
    for block in transformer.h:
        x = block_forward(block, x, mask, config.n_head, config.layer_norm_epsilon)
    return transformer.ln_f(x)


class GPT2Decoder:
    """Decode state for one batch: key/value buffers (L, 2, B, H, T, D) and the attention mask over them."""

    def __init__(self, model, prompt_mask: torch.Tensor, max_new_tokens: int):
        transformer, config = model.transformer, model.config
        self.heads, self.width, self.eps = config.n_head, config.n_embd, config.layer_norm_epsilon
        self.wte, self.wpe, self.ln_f, self.lm_head = (
            transformer.wte.weight,
            transformer.wpe.weight,
            transformer.ln_f,
            model.lm_head.weight,
        )
        self.blocks = transformer.h
        B, P = prompt_mask.shape
        D = self.width // self.heads
        self.kv = self.wte.new_zeros((len(self.blocks), 2, B, self.heads, P + max_new_tokens, D))
        # (B, 1, 1, T) True where a query may attend: real prompt tokens, then every generated position
        self.allowed = torch.ones((B, 1, 1, P + max_new_tokens), dtype=torch.bool, device=prompt_mask.device)
        self.allowed[:, 0, 0, :P] = prompt_mask.bool()
        self.length = 0

    def prefill(self, prompt_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encode the (left-padded) prompts (B, P) at positions (B, P) into the buffers -> next-token logits (B, V)."""
        B, P = prompt_ids.shape
        C, H = self.width, self.heads
        causal = torch.ones((P, P), dtype=torch.bool, device=prompt_ids.device).tril()
        # real keys up to the query; a padding query sees itself only (its output is never read)
        mask = (self.allowed[..., :P] & causal) | torch.eye(
            P, dtype=torch.bool, device=prompt_ids.device
        )  # (B, 1, P, P)
        x = self.wte[prompt_ids] + self.wpe[positions]  # (B, P, C)
        for i, block in enumerate(self.blocks):
            x = block_forward(block, x, mask, H, self.eps, self.kv[i, :, :, :, :P])
        self.length = P
        return F.layer_norm(x[:, -1], (C,), self.ln_f.weight, self.ln_f.bias, self.eps) @ self.lm_head.t()  # (B, V)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: token (B,), position (B,) -> next-token logits (B, V)."""
        B, C, H = token.shape[0], self.width, self.heads
        t = self.length
        x = self.wte[token] + self.wpe[position]  # (B, C)
        mask = self.allowed[..., : t + 1]  # (B, 1, 1, t + 1)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, self.eps)
            q, k, v = (
                torch.addmm(attn.c_attn.bias, h, attn.c_attn.weight).view(B, 3, H, 1, C // H).unbind(1)
            )  # (B, H, 1, D) each
            self.kv[i, 0, :, :, t : t + 1] = k
            self.kv[i, 1, :, :, t : t + 1] = v
            a = F.scaled_dot_product_attention(
                q, self.kv[i, 0, :, :, : t + 1], self.kv[i, 1, :, :, : t + 1], attn_mask=mask
            )  # (B, H, 1, D)
            x = torch.addmm(attn.c_proj.bias, a.view(B, C), attn.c_proj.weight).add_(x)
            h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, self.eps)
            h = F.gelu(torch.addmm(mlp.c_fc.bias, h, mlp.c_fc.weight), approximate="tanh")  # gelu_new
            x = torch.addmm(mlp.c_proj.bias, h, mlp.c_proj.weight).add_(x)
        self.length = t + 1
        return F.layer_norm(x, (C,), self.ln_f.weight, self.ln_f.bias, self.eps) @ self.lm_head.t()  # (B, V)
