"""The frozen reference policy π_ref of the offline preference methods (DPO/IPO, KTO): log π(y|x) of whole
responses, the tokenizer check, and DPO's cache of reference log-probs.

π_ref never changes, so DPO computes its log-probs once, before the first step, under ``inference_mode`` and the
policy's autocast precision, and caches them in the run folder as ``reference-logps-<key>.safetensors`` (the key
hashes the reference weights, the precision when not fp32, and every token id: a resume or rerun reuses it; new
data, tokenizer, lengths or precision recompute it). With LoRA, π_ref is the base model with its adapters off;
else ``ref_model`` or the starting model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch

from tuneoff.data.pairs import TokenizedPair, make_batches
from tuneoff.errors import TuneoffError
from tuneoff.losses import IGNORE, selected_logprobs, shift_targets, sum_by_row


def check_tokenizer(config, tokenizer) -> None:
    """π and π_ref are compared token by token: a ``ref_model`` with another vocabulary is an error."""
    from tuneoff.models.load import load_tokenizer

    if config.ref_model and load_tokenizer(config.ref_model).get_vocab() != tokenizer.get_vocab():
        raise TuneoffError(
            f"ref_model {config.ref_model} has another tokenizer than model {config.model}: the method compares "
            "their log-probs token by token"
        )


def adapters_off(model):
    """The base model's function inside the context: a peft model's adapters disabled (else nothing changes)."""
    return model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()


class SequenceLogProbs(torch.nn.Module):
    """Wraps a causal LM: forward returns log π(y|x) summed over each row's labelled tokens and their count.

    The LM head runs only at labelled positions (as ``TokenLoss`` in sft.py): with a 49k vocabulary it is
    most of a small model's cost. Being the module DDP wraps, its forward keeps gradient sync intact.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (2B, T, H)
        targets = shift_targets(labels)  # (2B, T)
        keep = targets != IGNORE
        per_token = selected_logprobs(head(hidden[keep]), targets[keep])  # (N,)
        return sum_by_row(per_token, keep), keep.sum(-1)  # (2B,), (2B,)


def weights_identity(name: str, random_init: bool, seed: int) -> dict:
    """What the reference weights depend on: the seed for random init, else the weight files' names, sizes, times."""
    from tuneoff.models.load import resolve

    if random_init:
        return {"model": name, "seed": seed}
    folder = resolve(name).resolve()
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    return {"model": str(folder), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


@torch.inference_mode()
def reference_logps(model, pairs: list[TokenizedPair], config, pad_id: int, accelerator) -> torch.Tensor:
    """log π_ref of every pair's chosen and rejected response, summed: (N, 2). Pairs are batched by length (less
    padding); process k scores batches k, k + world, ... and the rows are gathered."""
    from accelerate.utils import gather_object

    scorer = SequenceLogProbs(model).to(accelerator.device).eval()
    order = sorted(
        range(len(pairs)), key=lambda i: len(pairs[i].prompt) + max(len(pairs[i].chosen), len(pairs[i].rejected))
    )
    batches = make_batches([pairs[i] for i in order], config.ref_batch_size, pad_id, 0, 0, shuffle=False)
    rows = []
    for index in range(accelerator.process_index, len(batches), accelerator.num_processes):
        with accelerator.autocast():  # the policy's precision: π = π_ref at step 0 under bf16 too
            logps, _ = scorer(
                *(batches[index][k].to(accelerator.device) for k in ("input_ids", "attention_mask", "labels"))
            )
        chosen, rejected = logps.cpu().chunk(2)
        rows += [
            (order[index * config.ref_batch_size + i], c, r)
            for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))
        ]
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    return torch.tensor([[c, r] for _, c, r in sorted(rows)], dtype=torch.float32)  # (N, 2)


def attach_reference(model, pairs: list[TokenizedPair], config, pad_id: int, accelerator, out: Path) -> str:
    """Fill ``ref_chosen``/``ref_rejected`` of every pair from the run folder's cache, or compute and cache them."""
    from safetensors.torch import load_file, save_file

    from tuneoff.models.load import load_model

    ref_name = config.ref_model or config.model
    identity = weights_identity(
        ref_name, not config.ref_model and (config.from_scratch or ref_name == "tiny"), config.seed
    )
    if accelerator.mixed_precision != "no":  # autocast changes the values; fp32 keeps its keys of before
        identity["precision"] = accelerator.mixed_precision
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for p in pairs:
        digest.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    path = out / f"reference-logps-{digest.hexdigest()[:16]}.safetensors"
    if path.exists():
        values, how = (
            torch.stack([load_file(path)[k] for k in ("chosen", "rejected")], 1),
            f"reused from {path.name}",
        )  # (N, 2)
    else:
        start = time.perf_counter()
        if config.ref_model:
            values = reference_logps(load_model(config.ref_model), pairs, config, pad_id, accelerator)
        else:
            with adapters_off(model):
                values = reference_logps(model, pairs, config, pad_id, accelerator)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(".tmp")
            save_file(
                {"chosen": values[:, 0].contiguous(), "rejected": values[:, 1].contiguous()},
                staging,
                metadata={"reference": ref_name},
            )
            staging.rename(path)  # atomic: a kill never leaves a half-written cache
        how = f"computed once for {len(pairs)} pairs in {time.perf_counter() - start:.1f} s, cached in {path.name}"
    for p, (chosen, rejected) in zip(pairs, values.tolist()):
        p.ref_chosen, p.ref_rejected = chosen, rejected
    return how
