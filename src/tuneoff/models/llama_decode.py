"""A lean decode step for Llama-family models (SmolLM2, Qwen2/2.5, Llama 3, Mistral without a sliding window):
the same math as transformers' forward, fewer operations.

Why: transformers' forward spends its per-call time on mask construction, cache objects, module hooks and output
dataclasses, once per layer and step; :mod:`tuneoff.models.gpt2_decode` does the same job for GPT-2. This step
reads the model's own weights (no copy, so it always sees the current policy), keeps keys and values in one
preallocated buffer per layer (B, KV, T, D), and per layer runs RMSNorm, the q/k/v projections, rotary
embeddings, grouped-query attention over the buffer (the query heads of a key/value head as queries of one head,
no repeated keys), the output projection and the SwiGLU MLP: about 20 tensor operations. Rotary cos/sin come from
the model's own ``rotary_emb`` module, called with the same positions as transformers calls it, so every rope type
(default, linear, llama3, yarn, and dynamic, whose frequencies follow the length seen) gives the same tables.

On a CPU at small batch the matrix products are most of a step: on SmolLM2-135M at batch 8 (2-core EPYC, MKL)
42 of transformers' 55 ms. So the step also computes each product in whichever of MKL's two orientations reads
that weight faster (:func:`rows_linear`): 33 ms of products, 38 ms a step.

Used by :func:`tuneoff.rollout.generate` and :func:`tuneoff.train.policy.response_logprobs` when :func:`supports`
says the model is in a configuration this reproduces, LoRA adapters (peft) on its linear layers included; everything
else takes transformers' forward. Parity with it
is tested on logits, greedy and sampled output, and packed hidden states with their gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
ATTENTION = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
MLP = ("gate_proj", "up_proj", "down_proj")


def unwrapped(model):
    """The transformers model inside a peft LoRA wrapper (the adapters stay injected in its layers), else the model
    (a prompt-learning wrapper, whose virtual tokens live outside the layers, stays wrapped: not supported)."""
    config = getattr(model, "active_peft_config", None)
    if hasattr(model, "get_base_model") and getattr(config, "peft_type", None) == "LORA":
        return model.get_base_model()
    return model


def is_plain_lora(module) -> bool:
    """A peft LoRA ``Linear`` over a plain ``nn.Linear`` whose adapters this module reproduces exactly: at most one
    active adapter, no DoRA or other variant, no live dropout on its input, not merged (peft would unmerge it when
    the adapters are switched off), adapters in the base weight's dtype (peft casts otherwise)."""
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear or module.merged:
        return False
    active = [a for a in module.active_adapters if a in module.lora_A]
    dtype = module.base_layer.weight.dtype
    if any(p.dtype != dtype for a in active for p in (module.lora_A[a].weight, module.lora_B[a].weight)):
        return False
    if len(active) > 1 or any(module.use_dora.get(a, False) for a in active):
        return False
    if getattr(module, "lora_variant", {}) and any(module.lora_variant.get(a) for a in active):
        return False
    dropout = [module.lora_dropout[a] for a in active]
    return not any(isinstance(d, torch.nn.Dropout) and d.p > 0 and d.training for d in dropout)


def supports(model) -> bool:
    """A plain Llama, Qwen2 or Mistral causal LM (or one wrapped by peft with LoRA adapters on its linear layers):
    silu MLP, full causal attention (no sliding window), eager or SDPA attention, ``nn.Linear`` projections or LoRA
    over them (:func:`is_plain_lora`), an unadapted embedding, no dropout that could fire."""
    model = unwrapped(model)
    config = getattr(model, "config", None)
    if type(model).__name__ not in CLASSES or config is None or not hasattr(model, "model"):
        return False
    layers = model.model.layers[: config.num_hidden_layers]
    linears = [model.lm_head] + [
        getattr(part, name)
        for layer in layers
        for part, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, MLP))
        for name in names
    ]
    adapted = {id(m) for m in linears if is_plain_lora(m)}
    if any(type(m).__module__.startswith("peft.") and id(m) not in adapted for m in model.modules()):
        return False  # adapters of a kind, or on a layer, this path does not reproduce
    plain = (
        config.hidden_act == "silu"
        and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        and all(type(m) is torch.nn.Linear or id(m) in adapted for m in linears)
        and type(model.model.embed_tokens) is torch.nn.Embedding
        and all(type(layer.self_attn).__name__ in ATTENTION for layer in layers)
        and all(getattr(layer.self_attn, "sliding_window", None) is None for layer in layers)  # Qwen2
        and all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())
        and (type(model).__name__ != "MistralForCausalLM" or config.sliding_window is None)
    )
    dropout_live = model.training and (
        (config.attention_dropout or 0) > 0
        or any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training)
    )
    return bool(plain) and not dropout_live


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' LlamaRMSNorm: variance in float32, normalised value cast back before the weight multiplies.
    In float32 that is torch's one-kernel rms_norm; other dtypes follow transformers' order of roundings."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def rotary(model, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (..., D) for positions (...,) from the model's own rotary module, in x's dtype.

    The sign of rotate_half is folded into sin: rotate_half(q) · sin = roll(q) · cat(−sin₁, sin₂), bit for bit."""
    cos, sin = model.model.rotary_emb(x, positions)  # (B, T, D) each
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), -1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin with the signed sin of :func:`rotary`; x (..., D), cos/sin broadcastable."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), -1), sin, out=out)


def mlp(layer, x: torch.Tensor) -> torch.Tensor:
    """The residual stream after the layer's SwiGLU MLP: x + down(silu(gate(h)) · up(h)), h = RMSNorm(x). The
    projections are called as modules: a plain linear is ``F.linear`` itself, a LoRA one runs peft's forward."""
    m = layer.mlp
    h = rms_norm(x, layer.post_attention_layernorm)
    return m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h)) + x


def block_forward(
    layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None = None
) -> torch.Tensor:
    """One decoder layer over whole sequences: x (B, T, C), cos/sin (B, T, D), mask (B, 1, T, T) bool (True: the
    query sees the key) -> (B, T, C). Writes the rotated keys and the values into ``kv`` (2, B, KV, T, D) when
    given. Autograd flows through it as through the module."""
    B, T, _ = x.shape
    attn = layer.self_attn
    D = attn.head_dim
    h = rms_norm(x, layer.input_layernorm)
    q = attn.q_proj(h).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)  # (B, KV, T, D)
    v = attn.v_proj(h).view(B, T, -1, D).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same for every head
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if kv is not None:
        kv[0], kv[1] = k, v
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)  # (B, H, T, D)
    x = attn.o_proj(a.transpose(1, 2).reshape(B, T, -1)) + x
    return mlp(layer, x)


def packed_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the last norm) of padding-free packed rows (R, W), positions restarting at 0 for
    each sequence (filler continuing the last one): what ``model.model(input_ids=, position_ids=)`` returns,
    without its per-call work. Autograd flows through it as through the module."""
    model = unwrapped(model)
    inner = model.model
    W = input_ids.shape[1]
    segment = (position_ids == 0).cumsum(-1)  # (R, W) which sequence of its row each position belongs to
    causal = torch.ones((W, W), dtype=torch.bool, device=input_ids.device).tril()
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # (R, 1, W, W)
    x = inner.embed_tokens(input_ids)  # (R, W, C); the module, so its padding_idx keeps its gradient rule
    cos, sin = rotary(model, x, position_ids)  # (R, W, D)
    for layer in inner.layers[: model.config.num_hidden_layers]:
        x = block_forward(layer, x, cos, sin, mask)
    return rms_norm(x, inner.norm)


class LlamaDecoder:
    """Decode state for one batch: key/value buffers (L, 2, B, KV, T, D) and the attention mask over them."""

    def __init__(self, model, prompt_mask: torch.Tensor, max_new_tokens: int):
        model = unwrapped(model)
        inner = model.model
        self.model = model
        self.layers = inner.layers[: model.config.num_hidden_layers]
        self.embed, self.norm, self.head = inner.embed_tokens.weight, inner.norm, model.lm_head
        attn = self.layers[0].self_attn
        kv_width, q_width = attn.k_proj.out_features, attn.q_proj.out_features  # LoRA layers carry them too
        self.dim, self.kv_heads = attn.head_dim, kv_width // attn.head_dim
        self.groups = q_width // kv_width  # query heads per key/value head
        B, P = prompt_mask.shape
        self.kv = self.embed.new_zeros((len(self.layers), 2, B, self.kv_heads, P + max_new_tokens, self.dim))
        # (B, 1, 1, T) True where a query may attend: real prompt tokens, then every generated position
        self.allowed = torch.ones((B, 1, 1, P + max_new_tokens), dtype=torch.bool, device=prompt_mask.device)
        self.allowed[:, 0, 0, :P] = prompt_mask.bool()
        self.padded = not bool(prompt_mask.bool().all())  # without padding a step needs no mask at all
        self.queries = self.embed.new_empty((B, self.kv_heads * self.groups, self.dim))  # a step's rotated queries
        self.length = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, C) -> next-token logits (B, V), perhaps a transposed view (:func:`rows_linear`)."""
        return rows_linear(rms_norm(x, self.norm), self.head)

    def prefill(self, prompt_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encode the (left-padded) prompts (B, P) at positions (B, P) into the buffers -> next-token logits (B, V)."""
        P = prompt_ids.shape[1]
        causal = torch.ones((P, P), dtype=torch.bool, device=prompt_ids.device).tril()
        # real keys up to the query; a padding query sees itself only (its output is never read)
        mask = (self.allowed[..., :P] & causal) | torch.eye(P, dtype=torch.bool, device=prompt_ids.device)
        x = self.embed[prompt_ids]  # (B, P, C)
        cos, sin = rotary(self.model, x, positions)  # (B, P, D)
        for i, layer in enumerate(self.layers):
            x = block_forward(layer, x, cos, sin, mask, self.kv[i, :, :, :, :P])
        self.length = P
        return self.logits(x[:, -1])

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: token (B,), position (B,) -> next-token logits (B, V)."""
        B, t = token.shape[0], self.length
        KV, G, D = self.kv_heads, self.groups, self.dim
        x = self.embed[token]  # (B, C), a fresh tensor: the residual stream is updated in place
        cos, sin = rotary(self.model, x[:, None], position[:, None])  # (B, 1, D): broadcast over heads
        mask = self.allowed[..., : t + 1] if self.padded else None  # (B, 1, 1, t + 1)
        q = self.queries  # (B, H, D)
        for i, layer in enumerate(self.layers):
            attn, m = layer.self_attn, layer.mlp
            h = rms_norm(x, layer.input_layernorm)
            keys, values = self.kv[i, 0, :, :, : t + 1], self.kv[i, 1, :, :, : t + 1]  # (B, KV, t + 1, D)
            rope(rows_linear(h, attn.q_proj).view(B, KV * G, D), cos, sin, out=q)
            rope(rows_linear(h, attn.k_proj).view(B, KV, D), cos, sin, out=keys[:, :, t])
            values[:, :, t] = rows_linear(h, attn.v_proj).view(B, KV, D)
            # the G query heads of a key/value head as G queries of one head: no repeated keys (as transformers)
            a = F.scaled_dot_product_attention(
                q.view(B, KV, G, D), keys, values, attn_mask=mask, scale=attn.scaling
            )  # (B, KV, G, D)
            x.add_(rows_linear(a.reshape(B, KV * G * D), attn.o_proj))
            h = rms_norm(x, layer.post_attention_layernorm)
            h = F.silu(rows_linear(h, m.gate_proj)) * rows_linear(h, m.up_proj)  # (B, I)
            x.add_(rows_linear(h, m.down_proj))
        self.length = t + 1
        return self.logits(x)


def rows_linear(x: torch.Tensor, linear) -> torch.Tensor:
    """``linear(x)`` for the few rows of a decode step, x (B, K) -> (B, N), perhaps a transposed view of (N, B).
    A LoRA layer (:func:`is_plain_lora`) adds its adapter as peft does: B(A(x)) · scaling after the base product.

    Why: at batch 8 the weights stream from memory once per step and MKL reads a wide one (N >= K) about twice
    as fast as W·xᵀ than as x·Wᵀ (SmolLM2-135M on a 2-core EPYC: its LM head 5.1 against 10.6 ms, gate and up
    165 against 267 µs, q and o 68 against 98 µs), while a narrow one (the MLP's down projection) is faster as
    x·Wᵀ (227 against 270 µs). The same sums of products, in another order. On other devices: plain F.linear."""
    lora = hasattr(linear, "base_layer")
    base = linear.base_layer if lora else linear
    W, bias = base.weight, base.bias
    if x.device.type != "cpu" or W.shape[0] < W.shape[1]:
        y = F.linear(x, W, bias)
    else:
        y = torch.mm(W, x.t()).t()  # (B, N)
        y = y if bias is None else y.add_(bias)
    if lora and not linear.disable_adapters and not linear.merged:
        for name in linear.active_adapters:
            if name in linear.lora_A:
                y = y + linear.lora_B[name](linear.lora_A[name](x)) * linear.scaling[name]
    return y
