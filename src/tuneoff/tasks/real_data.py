"""Real human preferences for an experiment: HH-RLHF harmless-base and PandaLM, split by prompt.

With no gold judge, alignment is judged by a reward model trained on a split that shares no prompt with the
feedback the arms learn from. Four disjoint splits by prompt (seeded):
- judge (45%): pairs for the held-out judge RM;
- train (40%): the feedback: proxy RM and DPO pairs; its prompts are the RL prompts;
- eval (5%): held-out pairs for the proxy RM's and DPO's accuracy;
- eval prompts (10%): the prompts every arm is evaluated on.
HH-RLHF transcripts become chat messages (Human -> user, Assistant -> assistant); a PandaLM instruction (with
its input) is one user message; PandaLM pairs carry the 2-of-3 majority label, ties dropped.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SPLITS = (("judge", 0.45), ("train", 0.40), ("eval", 0.05), ("eval_prompts", 0.10))
TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(transcript: str) -> list[dict]:
    """An HH-RLHF prompt transcript (ending with "\\n\\nAssistant:") as chat messages, the empty last turn dropped."""
    parts = TURN.split("\n\n" + transcript.lstrip("\n") if not transcript.startswith("\n\n") else transcript)
    messages = [
        {"role": "user" if who == "Human" else "assistant", "content": text.strip()}
        for who, text in zip(parts[1::2], parts[2::2])
    ]
    return [m for m in messages if m["content"]]


def preference_records(sources: list[str]) -> tuple[list[dict], list[str]]:
    """Preference records in the chat form ({prompt: messages, chosen, rejected, source}) and skip reasons."""
    from tuneoff.data.sources import HH_RLHF_HARMLESS_TEST, PANDALM_TEST, hh_rlhf_pairs, pandalm_pairs, shipped_data

    records, skipped = [], []
    if "hh-rlhf-harmless" in sources:
        pairs, reasons = hh_rlhf_pairs(shipped_data(HH_RLHF_HARMLESS_TEST))
        skipped += [f"hh-rlhf: {r}" for r in reasons]
        for p in pairs:
            messages = hh_messages(p.prompt)
            if messages and messages[-1]["role"] == "user":
                records.append(
                    {
                        "prompt": messages,
                        "chosen": p.chosen.strip(),
                        "rejected": p.rejected.strip(),
                        "source": "hh-rlhf",
                    }
                )
            else:
                skipped.append(f"hh-rlhf {p.where}: the prompt does not end with a human turn")
    if "pandalm" in sources:
        data = pandalm_pairs(shipped_data(PANDALM_TEST))
        skipped += [f"pandalm: {r}" for r in data.skipped]
        for p in data.to_preference_pairs(majority=True, drop_ties=True):
            records.append(
                {
                    "prompt": [{"role": "user", "content": p.prompt}],
                    "chosen": p.chosen,
                    "rejected": p.rejected,
                    "source": "pandalm",
                }
            )
    return [r for r in records if r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]], skipped


def split_by_prompt(records: list[dict], seed: int) -> dict[str, list[dict]]:
    """The four splits of :data:`SPLITS`; every record of one prompt lands in the same split."""
    prompts = sorted({json.dumps(r["prompt"], sort_keys=True) for r in records})
    random.Random(seed).shuffle(prompts)
    owner, start = {}, 0
    for i, (name, share) in enumerate(SPLITS):
        end = len(prompts) if i == len(SPLITS) - 1 else start + round(share * len(prompts))
        owner.update({p: name for p in prompts[start:end]})
        start = end
    splits: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    for r in records:
        splits[owner[json.dumps(r["prompt"], sort_keys=True)]].append(r)
    return splits


def _unique_prompts(records: list[dict], limit: int) -> list[dict]:
    seen, out = set(), []
    for r in records:
        key = json.dumps(r["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({"messages": r["prompt"]})
    return out[:limit] if limit > 0 else out


def build(spec: dict, folder: Path) -> dict:
    """Write judge.jsonl, train.jsonl, eval.jsonl, prompts.jsonl, eval_prompts.jsonl; cap each by the spec."""
    from tuneoff.data.formats import write_jsonl

    records, skipped = preference_records(spec.get("sources", ["hh-rlhf-harmless", "pandalm"]))
    splits = split_by_prompt(records, spec.get("seed", 0))
    caps = {"judge": spec.get("judge_pairs", 0), "train": spec.get("pairs", 0), "eval": spec.get("eval_pairs", 0)}
    files = {}
    for name in ("judge", "train", "eval"):
        rows = splits[name][: caps[name]] if caps[name] > 0 else splits[name]
        files[name] = write_jsonl(folder / f"{name}.jsonl", rows)
    files["prompts"] = write_jsonl(folder / "prompts.jsonl", _unique_prompts(splits["train"], spec.get("prompts", 0)))
    files["eval_prompts"] = write_jsonl(
        folder / "eval_prompts.jsonl", _unique_prompts(splits["eval_prompts"], spec.get("eval_prompts", 0))
    )
    counts = {name: sum(1 for _ in open(path)) for name, path in files.items()}
    return {
        **{k: str(v) for k, v in files.items()},
        "pairs": counts["train"],
        "counts": counts,
        "skipped": len(skipped),
        "agreement_with_gold": None,
        "sources": spec.get("sources", ["hh-rlhf-harmless", "pandalm"]),
    }
