"""Sampling speed: tuneoff's KV-cached rollout vs transformers' `generate`, alternating in one process.

    python -m bench.rollout [--model review-gpt] [--batches 8 32] [--new-tokens 64] [--repeats 3]

Both sample (temperature 1) exactly --new-tokens tokens per sequence (EOS is ignored so the work is equal),
from the same left-padded prompts, under torch.inference_mode. Prints new tokens/s, min/median/max over repeats,
and the ratio of medians. `bench.run` reuses `prompt_batch` and `SAMPLERS` (one sampler per fresh process).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def prompt_batch(tokenizer, batch: int):
    """(ids, mask) of `batch` held-out SST-2 beginnings, left-padded: the same prompts for both samplers."""
    from tuneoff.eval.alignment import held_out_prompts
    from tuneoff.rollout import left_pad

    prompts = held_out_prompts(batch, 4, 0)
    return left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], tokenizer.pad_token_id)


def tuneoff_sampler(model, tokenizer, ids, mask, new_tokens: int):
    """A call that samples `new_tokens` per row with tuneoff.rollout.generate and returns the tokens made."""
    from tuneoff.rollout import generate

    no_eos = len(tokenizer) + 10  # never sampled: every sequence runs the full length

    def sample() -> int:
        r = generate(model, ids, mask, new_tokens, no_eos, tokenizer.pad_token_id, 1.0)
        return int(r.response_mask.sum())

    return sample


def transformers_sampler(model, tokenizer, ids, mask, new_tokens: int):
    """The same with transformers' generate (KV cache, plain sampling, EOS unable to stop it early)."""

    @torch.inference_mode()
    def sample() -> int:
        g = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        return (g.shape[1] - ids.shape[1]) * ids.shape[0]

    return sample


SAMPLERS = {"tuneoff": tuneoff_sampler, "transformers": transformers_sampler}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="review-gpt")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tuneoff.models.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    print(
        f"# rollout vs generate, {args.model}, {args.new_tokens} new tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| batch | tuneoff new tok/s (min/median/max) | generate new tok/s (min/median/max) | ratio of medians |")
    print("|---|---|---|---|")
    for batch in args.batches:
        ids, mask = prompt_batch(tokenizer, batch)
        samplers = [make(model, tokenizer, ids, mask, args.new_tokens) for make in SAMPLERS.values()]
        rates: list[list[float]] = [[] for _ in samplers]
        for sample in samplers:  # warm-up
            sample()
        for _ in range(args.repeats):
            for sample, rate in zip(samplers, rates):
                start = time.perf_counter()
                n = sample()
                rate.append(n / (time.perf_counter() - start))
        a, b = rates
        fmt = lambda r: f"{min(r):,.0f} / {statistics.median(r):,.0f} / {max(r):,.0f}"  # noqa: E731
        print(f"| {batch} | {fmt(a)} | {fmt(b)} | {statistics.median(a) / statistics.median(b):.2f}× |", flush=True)


if __name__ == "__main__":
    main()
