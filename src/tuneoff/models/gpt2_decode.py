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
    plain = (config.activation_function == "gelu_new" and config.scale_attn_weights
             and not config.scale_attn_by_inverse_layer_idx and not config.reorder_and_upcast_attn)
    dropout_live = model.training and any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    return bool(plain) and not dropout_live


class GPT2Decoder:
    """Decode state for one batch: key/value buffers (L, 2, B, H, T, D) and the attention mask over them."""

    def __init__(self, model, prompt_mask: torch.Tensor, max_new_tokens: int):
        transformer, config = model.transformer, model.config
        self.heads, self.width, self.eps = config.n_head, config.n_embd, config.layer_norm_epsilon
        self.wte, self.wpe, self.ln_f, self.lm_head = transformer.wte.weight, transformer.wpe.weight, transformer.ln_f, model.lm_head.weight
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
        mask = (self.allowed[..., :P] & causal) | torch.eye(P, dtype=torch.bool, device=prompt_ids.device)  # (B, 1, P, P)
        x = self.wte[prompt_ids] + self.wpe[positions]  # (B, P, C)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, self.eps)
            qkv = torch.addmm(attn.c_attn.bias, h.view(B * P, C), attn.c_attn.weight).view(B, P, 3, H, C // H)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, P, D) each
            self.kv[i, 0, :, :, :P] = k
            self.kv[i, 1, :, :, :P] = v
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B * P, C)  # (B·P, C)
            x = torch.addmm(attn.c_proj.bias, a, attn.c_proj.weight).view(B, P, C) + x
            h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, self.eps).view(B * P, C)
            h = F.gelu(torch.addmm(mlp.c_fc.bias, h, mlp.c_fc.weight), approximate="tanh")  # gelu_new
            x = torch.addmm(mlp.c_proj.bias, h, mlp.c_proj.weight).view(B, P, C) + x
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
            q, k, v = torch.addmm(attn.c_attn.bias, h, attn.c_attn.weight).view(B, 3, H, 1, C // H).unbind(1)  # (B, H, 1, D) each
            self.kv[i, 0, :, :, t : t + 1] = k
            self.kv[i, 1, :, :, t : t + 1] = v
            a = F.scaled_dot_product_attention(q, self.kv[i, 0, :, :, : t + 1], self.kv[i, 1, :, :, : t + 1], attn_mask=mask)  # (B, H, 1, D)
            x = torch.addmm(attn.c_proj.bias, a.view(B, C), attn.c_proj.weight).add_(x)
            h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, self.eps)
            h = F.gelu(torch.addmm(mlp.c_fc.bias, h, mlp.c_fc.weight), approximate="tanh")  # gelu_new
            x = torch.addmm(mlp.c_proj.bias, h, mlp.c_proj.weight).add_(x)
        self.length = t + 1
        return F.layer_norm(x, (C,), self.ln_f.weight, self.ln_f.bias, self.eps) @ self.lm_head.t()  # (B, V)
