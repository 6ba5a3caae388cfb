"""The workloads of `bench.run`: one definition each, shared by the tuneoff and the TRL child, plus their data.

A workload fixes everything both frameworks must agree on (model, data file, batch size, sequence length,
learning rate, number of units); `prepare` writes the data both children read, so they read the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    kind: str
    """sft, rm, dpo, grpo, ppo or sampling: which adapter runs it."""
    model: str
    """tuneoff preset; TRL gets the same Hugging Face folder (tuneoff.models.load.resolve)."""
    units: tuple[int, int]
    """(quick, full) units to run, the first being the untimed warm-up. A unit is one optimizer step, except
    PPO (one iteration = update_epochs optimizer steps)."""
    lr: float = 1e-5
    batch_size: int = 8
    max_length: int = 128
    lora: bool = False
    data: str = ""
    """A file under the repository, or `pairs` (preference pairs prepared by `prepare`)."""
    new_tokens: int = 32
    """RL: longest response; sampling: exact number of new tokens."""
    tuneoff_variant: dict = dataclasses.field(default_factory=dict)
    """Extra tuneoff flags for an additional tuneoff-only row (e.g. packing), compared with the same TRL run."""
    comparison: str = "trl"
    """What the B side is: trl (TRL 1.16), trl-1.12 (TRL 1.12's experimental PPO) or transformers (generate)."""
    notes: str = ""
    """What is not identical, printed under the table."""

    @property
    def metrics(self) -> tuple[str, ...]:
        return {
            "sft": ("tokens/s",),
            "rm": ("pairs/s",),
            "dpo": ("pairs/s",),
            "grpo": ("episodes/s", "new tokens/s"),
            "ppo": ("episodes/s", "new tokens/s"),
            "sampling": ("new tokens/s",),
        }[self.kind]

    @property
    def steps_per_unit(self) -> int:
        return PPO_EPOCHS if self.kind == "ppo" else 1


PPO_EPOCHS = 4
"""PPO epochs per iteration in both frameworks (rollout batch = minibatch = 8, so 4 optimizer steps)."""
KL_COEF = 0.05
"""β of the KL term in GRPO (k3, in the loss) and PPO (k1, in the reward): tuneoff's default, passed to TRL."""

WORKLOADS = [
    Workload(
        "sft-review-gpt",
        "sft",
        "review-gpt",
        (8, 40),
        lr=1e-4,
        data="examples/sst2_positive_sft.jsonl",
        tuneoff_variant={"packing": True},
        notes="TRL's SFTTrainer also computes entropy and top-1 accuracy over the vocabulary every step (its fused "
        "LM head); that is part of its cost. tuneoff runs its LM head on completion positions only. "
        "The packing row is tuneoff with --packing against the same (unpacked) TRL run.",
    ),
    Workload(
        "sft-smollm2-lora",
        "sft",
        "smollm2-135m",
        (3, 8),
        lr=1e-4,
        lora=True,
        data="examples/self_instruct_messages.jsonl",
        notes="tuneoff reads the messages; TRL reads the same conversations as conversational prompt/completion "
        "records (user turn = prompt, assistant turn = completion) so that its completion-only loss "
        "applies; both render them with SmolLM2's chat template. Records whose prompt alone fills "
        "max_length are left out of the file for both (tuneoff would drop them, TRL would keep them).",
    ),
    Workload(
        "sft-smollm2-full",
        "sft",
        "smollm2-135m",
        (3, 6),
        lr=1e-5,
        data="examples/self_instruct_messages.jsonl",
        notes="Full fine-tuning of all 134.5 M parameters, float32, same data and conversion as sft-smollm2-lora; "
        "the workload of the issue's matmul-peak target.",
    ),
    Workload(
        "rm-review-gpt",
        "rm",
        "review-gpt",
        (8, 40),
        data="pairs",
        notes="TRL tokenizes prompt+response as one string, tuneoff prompt and response separately (the same "
        "ids wherever the response starts with a space). tuneoff's head has a bias, TRL's "
        "(GPT2ForSequenceClassification.score) has none; both read the last real token. tuneoff packs each pair's "
        "prompt once (the rejected response attends to it, not to the chosen one) and runs the last block's "
        "query, MLP and final norm only where the reward is read: the same rewards, tested.",
    ),
    Workload(
        "dpo-review-gpt",
        "dpo",
        "review-gpt",
        (8, 40),
        max_length=64,
        data="pairs",
        notes="Reference log-probs are computed once before training in both (tuneoff always does; TRL with "
        "precompute_ref_log_probs=True, batch 32): outside the timed steps. TRL's default (a reference "
        "forward every step) would cost it one more no-grad forward per step. max_length 64 truncates "
        "no pair of this data.",
    ),
    Workload(
        "grpo-review-gpt",
        "grpo",
        "review-gpt",
        (4, 20),
        data="examples/sst2_prompts.jsonl",
        notes="2 prompts × 4 samples per step, ≤ 32 new tokens, temperature 1, β = 0.05 k3 KL in the loss, one "
        "update per rollout, group-std scaled advantages, reward = the gold judge (tuneoff's GoldScorer "
        "in both). TRL: loss_type=bnpo (token mean over the batch, which is tuneoff's normalisation), "
        "use_bias_correction_kl=False, disable_dropout=True. tuneoff's π_old is the sampling "
        "log-prob (ratio ≈ 1), TRL's the detached current log-prob (ratio = 1).",
    ),
    Workload(
        "ppo-review-gpt",
        "ppo",
        "review-gpt",
        (3, 10),
        data="examples/sst2_prompts.jsonl",
        comparison="trl-1.12",
        notes="TRL 1.16 has no PPOTrainer: TRL 1.12.0's trl.experimental.ppo (installed with --no-deps into "
        "bench/.trl112, first on sys.path in its child). Rollout 8, 4 epochs, minibatch 8, fixed β = 0.05 "
        "k1 KL in the reward, γ 1, λ 0.95, clip 0.2/0.2, vf_coef 0.1; gradient clipping off in both (TRL's "
        "PPO never clips); stop at EOS in both. The gold judge is the reward in both: TRL's get_reward is "
        "routed to it for the reward model. The critic's head starts at zero in tuneoff, random in TRL.",
    ),
    Workload(
        "rm-smollm2-lora",
        "rm",
        "smollm2-135m",
        (3, 8),
        lr=1e-4,
        lora=True,
        data="pairs",
        notes="As rm-review-gpt on SmolLM2-135M-Instruct with LoRA r16 on every linear layer (α 32, dropout 0.05) and "
        "a trained reward head in both (TRL: peft's SEQ_CLS task, whose `score` head is a module to save).",
    ),
    Workload(
        "dpo-smollm2-lora",
        "dpo",
        "smollm2-135m",
        (3, 8),
        lr=1e-4,
        max_length=64,
        lora=True,
        data="pairs",
        notes="As dpo-review-gpt on SmolLM2-135M-Instruct with LoRA r16; π_ref is the base with its adapters off in "
        "both, its log-probs computed once before training.",
    ),
    Workload(
        "grpo-smollm2-lora",
        "grpo",
        "smollm2-135m",
        (3, 6),
        lr=1e-4,
        lora=True,
        data="examples/sst2_prompts.jsonl",
        notes="As grpo-review-gpt on SmolLM2-135M-Instruct with LoRA r16 (π_ref: adapters off, in both); the "
        "prompts are plain review beginnings (no chat template) and the gold judge is the reward, as on review-gpt.",
    ),
    Workload(
        "ppo-smollm2-lora",
        "ppo",
        "smollm2-135m",
        (3, 5),
        lr=1e-4,
        lora=True,
        data="examples/sst2_prompts.jsonl",
        comparison="trl-1.12",
        notes="As ppo-review-gpt on SmolLM2-135M-Instruct with LoRA r16 on the policy (π_ref: adapters off) and a "
        "fully trained critic in both (TRL's value model is a separate SmolLM2 with a scalar head).",
    ),
    Workload(
        "sampling-b8",
        "sampling",
        "review-gpt",
        (3, 4),
        batch_size=8,
        new_tokens=64,
        comparison="transformers",
        notes="tuneoff.rollout.generate vs transformers' generate (KV cache, do_sample, temperature 1, top_k 0), "
        "exactly 64 new tokens per sequence (EOS never stops either), from bench/rollout.py. A unit is "
        "one generate call.",
    ),
    Workload(
        "sampling-b32",
        "sampling",
        "review-gpt",
        (3, 4),
        batch_size=32,
        new_tokens=64,
        comparison="transformers",
        notes="as sampling-b8, 32 sequences per call.",
    ),
    Workload(
        "sampling-smollm2-b8",
        "sampling",
        "smollm2-135m",
        (3, 4),
        batch_size=8,
        new_tokens=64,
        comparison="transformers",
        notes="as sampling-b8 on SmolLM2-135M-Instruct (tuneoff's lean Llama-family decode path).",
    ),
    Workload(
        "sampling-smollm2-b32",
        "sampling",
        "smollm2-135m",
        (3, 4),
        batch_size=32,
        new_tokens=64,
        comparison="transformers",
        notes="as sampling-smollm2-b8, 32 sequences per call.",
    ),
]


def select(names: str) -> list[Workload]:
    """`a,b`: workloads named a or b, or whose name starts with `a-` (`sampling` selects both batch sizes)."""
    if not names:
        return list(WORKLOADS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    chosen = [w for w in WORKLOADS if any(w.name == n or w.name.startswith(n + "-") for n in wanted)]
    unknown = [n for n in wanted if not any(w.name == n or w.name.startswith(n + "-") for w in WORKLOADS)]
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(w.name for w in WORKLOADS)}")
    return chosen


# ---------------------------------------------------------------- data both children read


def prepare(workload: Workload, units: int, folder: Path) -> dict:
    """Write the workload's data into `folder`; returns {"data": path} for the children."""
    folder.mkdir(parents=True, exist_ok=True)
    convert_once(workload.model)
    if workload.data == "pairs":
        return {"data": str(write_pairs(folder / "pairs.jsonl", units * workload.batch_size))}
    source = ROOT / workload.data
    if workload.kind == "sft" and "messages" in json.loads(source.read_text().splitlines()[0]):
        return {
            "data": str(fitting_conversations(source, workload.model, workload.max_length, folder / "messages.jsonl"))
        }
    return {"data": str(source)}


def convert_once(model: str) -> None:
    """SmolLM2 is converted from GGUF once (≈ 25 s, 1 GB): in a throwaway process, before any timed child."""
    import subprocess
    import sys

    if model != "smollm2-135m":
        return
    subprocess.run([sys.executable, "-c", f"from tuneoff.models.load import resolve; resolve({model!r})"], check=True)


def default_pairs_file() -> Path | None:
    """The default task's training pairs when they are already built (building them takes minutes)."""
    from tuneoff.models.load import cache_dir
    from tuneoff.tasks.default_task import INFO_FILE, TRAIN_FILE, DefaultTaskConfig, cache_key

    folder = cache_dir() / "default-task" / cache_key(DefaultTaskConfig())
    return folder / TRAIN_FILE if (folder / INFO_FILE).exists() else None


def write_pairs(path: Path, count: int) -> Path:
    """The first `count` pairs as plain {prompt, chosen, rejected} records (no extra columns for TRL to carry).

    From the default task when it is cached; otherwise pairs derived from the SFT examples (a review's own
    continuation preferred over the next review's), which cost nothing to build.
    """
    source = default_pairs_file()
    if source is not None:
        records = [json.loads(line) for line in source.read_text().splitlines()[:count]]
    else:
        sft = [json.loads(line) for line in (ROOT / "examples/sst2_positive_sft.jsonl").read_text().splitlines()]
        records = [
            {"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
            for a, b in zip(sft, sft[1:] + sft[:1])
        ][:count]
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in records))
    return path


def fitting_conversations(source: Path, model: str, max_length: int, path: Path) -> Path:
    """The conversations whose prompt (chat template, generation prompt on) leaves room for a completion token."""
    from tuneoff.models.load import load_tokenizer

    tokenizer = load_tokenizer(model)
    kept = []
    for line in source.read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        if len(prompt["input_ids"]) < max_length:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return path
