"""A GPT-2's last block evaluated only where a reward is read: the same math as transformers', less of it.

A last-token reward model reads one hidden state per sequence, yet a plain forward runs the last block on every
position. Only that block's keys and values are needed everywhere; its query, attention output, MLP and the
final layer norm matter at the read positions alone. So the decoder runs without its last block (and without
``ln_f``), and this module finishes the block for the read positions: on review-gpt (4 layers) that skips about a
fifth of a reward model's forward and backward work. Parity with transformers' full forward is tested.

Used by :meth:`tuneoff.models.heads.RewardModel.forward_packed` when :func:`supports` says the model is a plain
GPT-2 (the conditions of :mod:`tuneoff.models.gpt2_decode`: no adapters, no live dropout, default scaling).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from tuneoff.models.gpt2_decode import supports  # noqa: F401  (the same conditions)


@contextlib.contextmanager
def without_last_block(transformer):
    """The GPT2Model with its last block and final layer norm removed, for the duration of the block."""
    blocks, ln_f = transformer.h, transformer.ln_f
    transformer.h, transformer.ln_f = torch.nn.ModuleList(list(blocks)[:-1]), torch.nn.Identity()
    try:
        yield transformer
    finally:
        transformer.h, transformer.ln_f = blocks, ln_f


def at_positions(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Final hidden states (after ln_f) at flat ``positions`` (K,) of (R, W) rows: (K, C).

    attention_mask (R, 1, W, W) bool, True where a query may attend to a key (a packed layout's own mask)."""
    transformer, config = model.transformer, model.config
    block = transformer.h[-1]
    with without_last_block(transformer) as trunk:
        hidden = trunk(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (R, W, C): the last block's input
    R, W, C = hidden.shape
    H, eps = config.n_head, config.layer_norm_epsilon
    D = C // H
    rows = positions // W  # (K,)
    x = F.layer_norm(hidden, (C,), block.ln_1.weight, block.ln_1.bias, eps)  # (R, W, C)
    weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: (C, 3C), (3C,) = [q | k | v]
    kv = (
        torch.addmm(bias[C:], x.reshape(-1, C), weight[:, C:]).view(R, W, 2, H, D).permute(2, 0, 3, 1, 4)
    )  # (2, R, H, W, D)
    # index_select, not indexing: its backward is index_add, many times faster on a CPU than indexing's index_put
    q = torch.addmm(bias[:C], x.reshape(-1, C).index_select(0, positions), weight[:, :C]).view(
        -1, H, 1, D
    )  # (K, H, 1, D)
    mask = attention_mask[rows, 0, positions % W][:, None, None, :]  # (K, 1, 1, W) what each read position sees
    keys, values = kv[0].index_select(0, rows), kv[1].index_select(0, rows)  # (K, H, W, D) each
    a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (K, H, 1, D)
    attn, mlp = block.attn, block.mlp
    h = torch.addmm(attn.c_proj.bias, a.reshape(-1, C), attn.c_proj.weight) + hidden.reshape(-1, C).index_select(
        0, positions
    )  # (K, C)
    m = F.layer_norm(h, (C,), block.ln_2.weight, block.ln_2.bias, eps)
    h = (
        torch.addmm(
            mlp.c_proj.bias,
            F.gelu(torch.addmm(mlp.c_fc.bias, m, mlp.c_fc.weight), approximate="tanh"),
            mlp.c_proj.weight,
        )
        + h
    )
    return F.layer_norm(h, (C,), transformer.ln_f.weight, transformer.ln_f.bias, eps)  # (K, C)
