"""The default task, RLHF arms: PPO, GRPO and DPO on review-gpt vs the base, 3 seeds, judged by the gold judge.

    python -m bench.rl_default [--seeds 0 1 2] [--out runs/rl-default]

1. Proxy reward model: `tuneoff rm --data default` (review-gpt continuations labelled by simulated annotators).
2. RL prompts: beginnings of SST-2 *train* sentences (the default task's prompts).
3. Per seed: PPO and GRPO against the proxy RM, DPO on the same preference pairs; every run is timed.
4. Evaluation on 200 held-out SST-2 *dev* beginnings: gold P(positive) of one sampled continuation per prompt,
   proxy reward, KL(π‖π_base) per token. The base is evaluated with the same sampling seed.
5. Per arm: the gain in mean gold reward over the base per seed, with a Student-t 95% CI over seeds.
Everything lands in OUT/ (runs, eval JSON, summary.json); finished steps are reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    # arm: (verb, flags). Sized so each run stays within 3 minutes on 2 CPU cores.
    "ppo": ("ppo", ["--max-steps", "30", "--rollout-batch", "32", "--batch-size", "16", "--lr", "5e-5",
                    "--max-new-tokens", "24", "--kl-coef", "0.05", "--kl-target", "6", "--save-every", "10"]),
    "grpo": ("grpo", ["--max-steps", "80", "--rollout-batch", "32", "--batch-size", "16", "--num-generations", "4",
                      "--lr", "5e-5", "--max-new-tokens", "24", "--kl-coef", "0.05", "--save-every", "10"]),
    "dpo": ("dpo", ["--config", "configs/dpo-default.yaml"]),
}


def tuneoff(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuneoff.cli", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/rl-default")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--eval-prompts", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}

    rm = out / "rm"
    if not (rm / "model" / "config.json").exists():
        timings["rm"] = tuneoff("rm", "--config", "configs/rm-default.yaml", "--out", str(rm), "--resume" if rm.exists() else "--no-resume")
    prompts = out / "prompts.jsonl"
    if not prompts.exists():
        from tuneoff.data.default_task import train_prompts

        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train_prompts(4, 0)))

    def evaluate(model: str, name: str, seed: int) -> dict:
        path = out / "eval" / f"{name}-s{seed}.json"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tuneoff("eval", "--model", model, "--reference", "review-gpt", "--reward-model", str(rm / "model"),
                    "--prompts", str(args.eval_prompts), "--seed", str(seed), "--out", str(path))
        return json.loads(path.read_text())

    results: dict = {"base": {s: evaluate("review-gpt", "base", s) for s in args.seeds}}
    for arm in args.arms:
        verb, flags = ARMS[arm]
        results[arm] = {}
        for seed in args.seeds:
            run = out / f"{arm}-s{seed}"
            if not (run / "model" / "config.json").exists():
                data = ["--data", "default"] if verb == "dpo" else ["--data", str(prompts), "--reward-model", str(rm / "model")]
                timings[f"{arm}-s{seed}"] = tuneoff(verb, *flags, "--model", "review-gpt", *data, "--seed", str(seed),
                                                    "--out", str(run), *(["--resume"] if run.exists() else []))
                (out / "timings.json").write_text(json.dumps(timings, indent=1))
            results[arm][seed] = evaluate(str(run / "model"), arm, seed)

    from tuneoff.eval.alignment import t_ci

    summary = {"seeds": args.seeds, "timings_s": timings, "arms": {}}
    for arm, per_seed in results.items():
        gains = [per_seed[s]["gold_reward"]["mean"] - results["base"][s]["gold_reward"]["mean"] for s in args.seeds]
        summary["arms"][arm] = {
            "gold_reward": t_ci([per_seed[s]["gold_reward"]["mean"] for s in args.seeds]),
            "gold_gain_over_base": t_ci(gains) if arm != "base" else None,
            "proxy_reward": t_ci([per_seed[s]["proxy_reward"]["mean"] for s in args.seeds]),
            "kl_per_token": t_ci([per_seed[s]["kl_per_token"] for s in args.seeds]),
            "samples": per_seed[args.seeds[0]]["samples"][:3],
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("| arm | gold P(positive) | gain over base, 95% CI over seeds | proxy reward | KL/token | train s (max) |")
    print("|---|---|---|---|---|---|")
    for arm, s in summary["arms"].items():
        gain = s["gold_gain_over_base"]
        gain_text = f"{gain['mean']:+.3f} [{gain['ci_low']:+.3f}, {gain['ci_high']:+.3f}]" if gain else "—"
        times = [v for k, v in timings.items() if k.startswith(f"{arm}-s")]
        print(f"| {arm} | {s['gold_reward']['mean']:.3f} | {gain_text} | {s['proxy_reward']['mean']:.3f} | "
              f"{s['kl_per_token']['mean']:.4f} | {max(times) if times else 0:.0f} |")


if __name__ == "__main__":
    main()
