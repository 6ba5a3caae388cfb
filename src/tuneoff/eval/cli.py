"""`tuneoff eval`: a model's continuations of held-out prompts, judged by the gold judge (and a proxy RM).
`tuneoff rm-eval`: a reward model's accuracy, calibration and length bias on a preference file."""

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


def _rm_eval(args) -> int:
    from pathlib import Path

    import torch

    from tuneoff.data.formats import load_preferences
    from tuneoff.eval.reward_models import evaluate_rewards, read_subsets, score_pairs
    from tuneoff.feedback.judges import load_scorer

    pairs = load_preferences(args.data)
    subsets = read_subsets(args.data, len(pairs))
    if args.limit:
        pairs, subsets = pairs[: args.limit], subsets[: args.limit]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = load_scorer(args.reward_model, device)
    r_chosen, r_rejected = score_pairs(scorer, pairs, args.batch_size)
    words = lambda side: torch.tensor([len(getattr(p, side).split()) for p in pairs])  # noqa: E731
    result = evaluate_rewards(r_chosen, r_rejected, words("chosen"), words("rejected"), subsets)
    result = {"reward_model": args.reward_model, "data": args.data, **result}
    print(
        f"{args.reward_model} on {args.data}: {result['pairs']:,} pairs\n"
        f"accuracy {result['accuracy']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}] "
        "(95% Wilson interval; a tie counts one half)\n"
        f"ECE of sigmoid(r_chosen - r_rejected): {result['ece']:.3f}\n"
        f"length bias: correlation of reward with length in words {_number(result['length_corr'])}; accuracy "
        f"{_number(result['accuracy_shorter_preferred'])} where the preferred response is shorter "
        f"({result['pairs_shorter_preferred']:.0f} pairs), {_number(result['accuracy_longer_preferred'])} where "
        f"it is longer ({result['pairs_longer_preferred']:.0f})"
    )
    if "subsets" in result:
        print("\n| subset | pairs | accuracy [95% CI] |\n|---|---|---|")
        for name, row in result["subsets"].items():
            print(f"| {name} | {row['pairs']} | {row['accuracy']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _number(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"  # nan: no pairs of that kind, or a constant reward


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
    parser.add_argument(
        "--reward-model", default="", help="a reward model folder (tuneoff rm, or a HF classifier): also report it"
    )
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

    rm_eval = subparsers.add_parser(
        "rm-eval",
        help="a reward model's accuracy, calibration and length bias on a preference file",
        description="Score both responses of every pair with a reward model (a `tuneoff rm` folder, any Hugging "
        "Face sequence classifier with one label, or gold) and print pairwise accuracy with a 95%% CI, the ECE of "
        "sigmoid(r_chosen - r_rejected), the length bias, and per-subset accuracy when the records carry a "
        "`subset` field (RewardBench's format: prompt, chosen, rejected, subset).",
    )
    rm_eval.add_argument("--reward-model", required=True, help="a reward model folder, or gold")
    rm_eval.add_argument("--data", required=True, help="preference records (prompt, chosen, rejected[, subset])")
    rm_eval.add_argument("--batch-size", type=int, default=32, help="pairs scored at a time")
    rm_eval.add_argument("--limit", type=int, default=0, help="score only the first N pairs (0: all)")
    rm_eval.add_argument("--out", default="", help="write the JSON result here")
    rm_eval.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs (auto: CUDA if any)"
    )
    rm_eval.set_defaults(func=_rm_eval)
