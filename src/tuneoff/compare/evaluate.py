"""Held-out evaluation of one policy (one arm, one seed): samples, judge and proxy scores, KL to the base, diversity.

The same held-out prompts for every arm and seed (chosen by ``prompt_seed``); sampling seeded by the run's seed.
- across-input: one sample per prompt (``prompts`` of them): judge score, proxy score, length, KL(π‖π_base);
- per-input: ``samples_per_prompt`` samples of each of the first ``diversity_prompts`` prompts.
Everything per prompt is kept (``eval.json``), so win rates between arms pair the same prompts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class _Clock:
    """Wall and CPU seconds of one phase."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"wall_s": time.perf_counter() - self.wall, "cpu_s": time.process_time() - self.cpu}


def eval_prompt_file(spec: dict, folder: Path) -> str:
    if spec["eval_prompts"] != "default":
        return spec["eval_prompts"]
    from tuneoff.data.formats import write_jsonl
    from tuneoff.eval.alignment import held_out_prompts

    prompts = held_out_prompts(spec["eval"]["prompts"], spec["prompt_words"], spec["eval"]["prompt_seed"])
    return str(write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in prompts]))


def judge_scores(judge: str, prompts: list, texts: list[str], device: str = "cpu") -> list[float]:
    """The judge's verdict per response: gold = P(positive) of prompt + response; else a held-out RM's reward (on
    ``device``)."""
    if judge == "gold":
        from tuneoff.feedback.gold import load_gold_judge
        from tuneoff.feedback.judges import judge_text

        return load_gold_judge().score([judge_text(p, t) for p, t in zip(prompts, texts)]).tolist()
    from tuneoff.feedback.judges import load_reward_model

    return load_reward_model(judge, device).score(prompts, texts).tolist()


def _as_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(m.content for m in prompt)


def evaluate_arm(model_name: str, base_name: str, proxy: str | None, judge: str, spec: dict, folder: Path) -> dict:
    """Sample, score and measure one policy; writes ``folder/eval.json`` and returns the same dict."""
    from tuneoff.eval.alignment import exact_kl_per_token
    from tuneoff.eval.diversity import diversity_report
    from tuneoff.models.load import load_model, load_tokenizer
    from tuneoff.rollout import sample_responses
    from tuneoff.train.policy import encode_prompts

    settings = spec["eval"]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec["seed"])
    tokenizer = load_tokenizer(model_name)
    prompts = encode_prompts(eval_prompt_file(spec, folder), tokenizer, settings.get("max_prompt_length", 64))
    prompts.texts[:], prompts.ids[:] = prompts.texts[: settings["prompts"]], prompts.ids[: settings["prompts"]]
    device = spec.get("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = load_model(model_name).eval().to(device)
    generator = torch.Generator(device).manual_seed(10_000 + spec["seed"])
    T, new = settings["temperature"], settings["max_new_tokens"]

    clock = _Clock()
    tokens, texts, batches = sample_responses(model, tokenizer, prompts.ids, new, T, generator)
    k, d = settings["samples_per_prompt"], min(settings["diversity_prompts"], len(prompts.ids))
    group_tokens, group_texts, _ = sample_responses(
        model, tokenizer, [ids for ids in prompts.ids[:d] for _ in range(k)], new, T, generator
    )
    generation = clock.read()

    clock = _Clock()
    judged = judge_scores(judge, prompts.texts, texts, device)
    proxy_scores = None
    if proxy:
        from tuneoff.feedback.judges import load_reward_model

        proxy_scores = load_reward_model(proxy, device).score(prompts.texts, texts).tolist()
    kl = (
        0.0
        if spec["method"] == "base"
        else exact_kl_per_token(model, load_model(base_name).eval().to(device), batches, T)
    )
    groups = [group_texts[i * k : (i + 1) * k] for i in range(d)]
    grouped_tokens = [group_tokens[i * k : (i + 1) * k] for i in range(d)]
    diversity = diversity_report(groups, grouped_tokens, texts, tokens, len(tokenizer))
    scoring = clock.read()

    shown = settings["samples_shown"]
    result = {
        "arm": spec["arm"],
        "seed": spec["seed"],
        "model": model_name,
        "prompts": [_as_text(p) for p in prompts.texts],
        "responses": texts,
        "gold": judged,
        "proxy": proxy_scores,
        "lengths": [len(t) for t in tokens],
        "kl_per_token": kl,
        "diversity": diversity,
        "samples": [
            {"prompt": _as_text(p), "response": t, "gold": g}
            for p, t, g in list(zip(prompts.texts, texts, judged))[:shown]
        ],
        "phases": {"generation": generation, "scoring": scoring},
        "generated_tokens": sum(map(len, tokens)) + sum(map(len, group_tokens)),
    }
    (folder / "eval.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result
