"""`tuneoff eval`: a model's continuations of held-out prompts, judged by the gold judge (and a proxy RM)."""

from __future__ import annotations

import json


def _eval(args) -> int:
    from pathlib import Path

    from tuneoff.eval.alignment import distinct_n, evaluate_policy, held_out_prompts, mean_ci

    prompts = held_out_prompts(args.prompts, args.prompt_words, args.prompt_seed)
    result = evaluate_policy(
        args.model,
        prompts,
        args.seed,
        args.max_new_tokens,
        args.reference or None,
        args.reward_model or None,
        args.device,
    )
    summary = {
        "model": args.model,
        "prompts": len(prompts),
        "seed": args.seed,
        "gold_reward": mean_ci(result.gold),
        "proxy_reward": mean_ci(result.proxy) if result.proxy else None,
        "kl_per_token": result.kl_per_token,
        "distinct_1": distinct_n(result.continuations, 1),
        "distinct_2": distinct_n(result.continuations, 2),
        "samples": [
            {"prompt": p, "continuation": c, "gold": g}
            for p, c, g in list(zip(prompts, result.continuations, result.gold))[:5]
        ],
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    g = summary["gold_reward"]
    print(
        f"gold reward {g['mean']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}] over {g['n']} held-out prompts"
        + (f"; KL per token {result.kl_per_token:.4f}" if result.kl_per_token is not None else "")
    )
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="gold reward, proxy reward and KL of a model on held-out prompts",
        description="Sample one continuation per held-out SST-2 dev review beginning, score it "
        "with the gold judge (P(positive)), optionally with a proxy reward model, and measure "
        "KL(pi||pi_ref) per token against --reference.",
    )
    parser.add_argument("--model", required=True, help="model preset or folder")
    parser.add_argument("--reference", default="", help="reference model for the KL (e.g. review-gpt)")
    parser.add_argument("--reward-model", default="", help="a `tuneoff rm` folder: also report the proxy reward")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts (SST-2 dev beginnings)")
    parser.add_argument("--prompt-words", type=int, default=4, help="words per prompt")
    parser.add_argument("--prompt-seed", type=int, default=0, help="which dev reviews (fixed across models)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per continuation")
    parser.add_argument("--out", default="", help="write the JSON summary here")
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the models run (auto: CUDA if any)"
    )
    parser.set_defaults(func=_eval)
