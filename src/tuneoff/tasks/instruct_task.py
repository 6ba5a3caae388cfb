"""The verifiable-instructions task's prompts: human-written instructions with one to three verifiable constraints
(:mod:`tuneoff.feedback.constraints`) attached, split by instruction into train and held-out.

Instructions are the shipped Self-Instruct seed tasks (175, instruction + input) and the PandaLM test set's
instructions (deduplicated), each kept once. The split is by instruction: an instruction's hash decides its side,
so no instruction is ever on both, and adding sources never moves an instruction across. The open-ended creative
requests among them (poems, stories, jokes, slogans, lyrics: :func:`creative_prompts`) carry no constraints and
are never in either split: they are the set on which diversity is measured. Constraints are drawn
per instruction from a seeded generator, never two that contradict each other (all lowercase and all capitals;
JSON with bullets, paragraphs, a title, quotes, a postscript or an end phrase; quotes with a postscript or an end
phrase; a postscript with an end phrase), with arguments in IFEval's ranges.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from dataclasses import asdict

from tuneoff.feedback.constraints import Constraint

CONFLICTS = {
    frozenset({"change_case:english_lowercase", "change_case:english_capital"}),
    *(
        frozenset({"detectable_format:json_format", other})
        for other in (
            "detectable_format:number_bullet_lists",
            "length_constraints:number_paragraphs",
            "detectable_format:title",
            "startend:quotation",
            "detectable_content:postscript",
            "startend:end_checker",
            "detectable_format:number_highlighted_sections",
        )
    ),
    frozenset({"startend:quotation", "detectable_content:postscript"}),
    frozenset({"startend:quotation", "startend:end_checker"}),
    frozenset({"detectable_content:postscript", "startend:end_checker"}),
    frozenset({"change_case:english_capital", "startend:end_checker"}),  # the phrase is given in mixed case
    frozenset({"change_case:english_lowercase", "detectable_content:postscript"}),  # P.S. is capitalised
    frozenset({"change_case:english_lowercase", "startend:end_checker"}),
}
FORBIDDEN = ("very", "really", "important", "good", "thing", "basically")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.")
STOPWORDS = set(
    "about above after again against because before being below between could doing during every following "
    "given having other their there these those through under until which while would should write words "
    "sentence sentences something someone".split()
)


def instructions() -> list[tuple[str, str]]:
    """(source, instruction text) of every shipped instruction, each once: Self-Instruct's instruction with its
    first instance's input, then PandaLM's instruction with its input."""
    from tuneoff.data.sources import SELF_INSTRUCT_SEED, shipped_data

    seen, out = set(), []

    def add(source: str, instruction: str, given: str) -> None:
        text = instruction.strip() + (f"\n\n{given.strip()}" if given and given.strip() else "")
        if instruction.strip() and instruction.strip() not in seen:
            seen.add(instruction.strip())
            out.append((source, text))

    for line in SELF_INSTRUCT_SEED.read_text(encoding="utf-8").splitlines():
        if line.strip():
            task = json.loads(line)
            instances = task.get("instances") or [{"input": ""}]
            add(f"self-instruct:{task['id']}", task["instruction"], instances[0].get("input", ""))
    with gzip.open(shipped_data("pandalm/testset-v1.json.gz"), "rt", encoding="utf-8") as f:
        for row in json.load(f):
            add(f"pandalm:{row['idx']}", row["instruction"], row.get("input", ""))
    return out


CREATIVE = re.compile(
    r"^(write|compose|generate|come up with|create|tell me|give me|complete|make up|invent)\b.*"
    r"\b(poems?|poetry|story|stories|slogans?|haiku|songs?|lyrics|jokes?|limerick|tagline|fairy tale|rhymes?|"
    r"opening scene|creative)\b",
    re.IGNORECASE,
)


ANALYTIC = re.compile(r"\b(why|explain|answer|read|identify|classify|summari[sz]e|translate)\b", re.IGNORECASE)
"""Requests about a text rather than for one ("tell me why this joke is not funny")."""


def is_creative(instruction: str) -> bool:
    """An open-ended creative request: it asks to write (compose, tell, ...) a poem, story, joke, slogan, ..."""
    first = instruction.split("\n\n")[0].strip()
    return bool(CREATIVE.search(first)) and not ANALYTIC.search(first)


def creative_prompts() -> list[dict]:
    """{"prompt", "source"} of every shipped creative request (no constraints), in source order: 7 of them (the
    Self-Instruct seed tasks that ask for a haiku, a story, jokes, lyrics, rhymes). A small set: per-input
    diversity over several samples of each is what it measures."""
    return [{"prompt": text, "source": source} for source, text in instructions() if is_creative(text)]


def held_out(instruction: str, fraction: float) -> bool:
    """Whether an instruction is held out: its SHA-256 (of the instruction alone) below ``fraction``."""
    digest = hashlib.sha256(instruction.split("\n\n")[0].strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def draw_constraints(instruction: str, rng: random.Random, count: int) -> list[Constraint]:
    """``count`` compatible constraints for one instruction (arguments in IFEval's ranges; keywords taken from the
    instruction's own longer words where they are asked to appear)."""
    from tuneoff.feedback.constraints import KINDS

    content = [w.lower() for w in re.findall(r"[A-Za-z]{5,}", instruction) if w.lower() not in STOPWORDS]
    chosen: list[Constraint] = []
    kinds = list(KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        if len(chosen) == count:
            break
        if any(frozenset({kind, c.kind}) in CONFLICTS for c in chosen):
            continue
        relation = rng.choice(("at least", "less than"))
        if kind == "length_constraints:number_words":
            constraint = Constraint(kind, n=rng.choice((50, 100, 150, 200)), relation=relation)
        elif kind == "length_constraints:number_sentences":
            constraint = Constraint(kind, n=rng.choice((3, 5, 8)), relation=relation)
        elif kind == "length_constraints:number_paragraphs":
            constraint = Constraint(kind, n=rng.choice((2, 3, 4)))
        elif kind == "keywords:existence":
            if len(content) < 2:
                continue
            constraint = Constraint(kind, keywords=tuple(rng.sample(sorted(set(content)), 2)))
        elif kind == "keywords:forbidden_words":
            constraint = Constraint(kind, keywords=tuple(rng.sample(FORBIDDEN, 2)))
        elif kind == "keywords:frequency":
            if not content:
                continue
            constraint = Constraint(kind, keywords=(rng.choice(content),), n=rng.choice((2, 3)), relation=relation)
        elif kind in ("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"):
            constraint = Constraint(kind, n=rng.choice((2, 3, 4)))
        elif kind == "detectable_content:number_placeholders":
            constraint = Constraint(kind, n=rng.choice((1, 2, 3)))
        elif kind == "startend:end_checker":
            constraint = Constraint(kind, phrase=rng.choice(END_PHRASES))
        else:
            constraint = Constraint(kind)
        chosen.append(constraint)
    return chosen


def constrained_prompts(seed: int = 0, held_out_fraction: float = 0.2, max_constraints: int = 3) -> dict:
    """{"train": [...], "held_out": [...]}, each record {"prompt", "instruction", "source", "constraints"}: the
    instruction, then its constraints' instructions one per line; ``constraints`` as dicts
    (``Constraint(**c)`` rebuilds them). The draws depend on ``seed`` and the instruction only."""
    split = {"train": [], "held_out": []}
    for source, instruction in instructions():
        if is_creative(instruction):
            continue  # the creative set, measured apart
        rng = random.Random(f"{seed}:{instruction}")
        constraints = draw_constraints(instruction, rng, rng.randint(1, max_constraints))
        prompt = instruction + "\n\n" + "\n".join(c.instruction() for c in constraints)
        record = {
            "prompt": prompt,
            "instruction": instruction,
            "source": source,
            "constraints": [{**asdict(c), "keywords": list(c.keywords)} for c in constraints],
        }
        split["held_out" if held_out(instruction, held_out_fraction) else "train"].append(record)
    return split
