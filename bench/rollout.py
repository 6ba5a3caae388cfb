"""Sampling speed: tuneoff's KV-cached rollout vs transformers' `generate`, alternating in one process.

    python -m bench.rollout [--model review-gpt] [--batches 8 32] [--new-tokens 64] [--repeats 3]

Both sample (temperature 1) exactly --new-tokens tokens per sequence (EOS is ignored so the work is equal),
from the same left-padded prompts, under torch.inference_mode. Prints new tokens/s, min/median/max over repeats,
and the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="review-gpt")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tuneoff.eval.alignment import held_out_prompts
    from tuneoff.models.load import load_model_and_tokenizer
    from tuneoff.rollout import generate, left_pad

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    no_eos = len(tokenizer) + 10  # never sampled: every sequence runs the full length
    print(f"# rollout vs generate, {args.model}, {args.new_tokens} new tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| batch | tuneoff new tok/s (min/median/max) | generate new tok/s (min/median/max) | ratio of medians |")
    print("|---|---|---|---|")
    for batch in args.batches:
        prompts = held_out_prompts(batch, 4, 0)
        ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], tokenizer.pad_token_id)

        def ours() -> int:
            r = generate(model, ids, mask, args.new_tokens, no_eos, tokenizer.pad_token_id, 1.0)
            return int(r.response_mask.sum())

        @torch.inference_mode()
        def hf() -> int:
            g = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)
            return (g.shape[1] - ids.shape[1]) * batch

        rates: dict = {ours: [], hf: []}
        ours(), hf()  # warm-up
        for _ in range(args.repeats):
            for f in (ours, hf):
                start = time.perf_counter()
                n = f()
                rates[f].append(n / (time.perf_counter() - start))
        a, b = rates[ours], rates[hf]
        fmt = lambda r: f"{min(r):,.0f} / {statistics.median(r):,.0f} / {max(r):,.0f}"  # noqa: E731
        print(f"| {batch} | {fmt(a)} | {fmt(b)} | {statistics.median(a) / statistics.median(b):.2f}× |", flush=True)


if __name__ == "__main__":
    main()
