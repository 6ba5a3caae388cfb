"""The recipe that builds ``review-gpt``, the default demo's base model (``make review-gpt``).

1. Corpus: the review phrases of SST-2 *train* (dev and test stay unseen: demo prompts come from them).
   SST-2 lists every constituent of every parsed sentence, so most rows are fragments of longer rows;
   phrases of fewer than 4 words and phrases contained in a longer phrase are dropped, leaving the
   longest phrases (close to whole sentences). Text stays lower-cased and PTB-tokenized, as the gold
   judge reads it.
2. Tokenizer: byte-level BPE (``tokenizers``), 4,096 entries, with ChatML special tokens and template.
3. Model: GPT-2, 4 layers × 256 wide, 4 heads, 256 positions, tied embeddings (≈ 4.2 M parameters).
4. Pretraining: tuneoff's own SFT loop on ``{"text"}`` records with packing, fixed seed.
5. Export: fp16 safetensors + tokenizer + RECIPE.json (data hash, steps, tokens, held-out perplexity)
   into ``src/tuneoff/assets/review-gpt``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

from tuneoff.models.load import ASSETS, REVIEW_GPT_DIR

SST2_TRAIN = ASSETS / "data" / "sst2" / "train.tsv.gz"
VOCAB_SIZE = 4096
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL_CONFIG = dict(n_layer=4, n_head=4, n_embd=256, n_positions=256, resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)
# Training recipe: 32 packed rows × 128 tokens per step. Sized to finish within an hour on 2 CPU cores.
RECIPE = dict(
    steps=1200, batch_size=32, max_length=128, lr=2e-3, warmup_ratio=0.03, weight_decay=0.1, seed=0, eval_fraction=0.02
)


def read_phrases(path: Path = SST2_TRAIN) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [row[1].strip() for row in rows if len(row) == 2]


def corpus(phrases: list[str], min_words: int = 4) -> list[str]:
    """Unique phrases of at least ``min_words`` words that are not contained in a longer phrase."""
    unique = sorted({p for p in phrases if len(p.split()) >= min_words}, key=lambda p: (-len(p), p))
    by_trigram: dict[tuple, list[str]] = defaultdict(list)  # first-trigram index of kept phrases
    kept: list[str] = []
    for phrase in unique:
        words = phrase.split()
        key = tuple(words[:3])
        padded = f" {phrase} "
        if any(padded in f" {longer} " for longer in by_trigram.get(key, ())):
            continue
        kept.append(phrase)
        longer_words = words
        for i in range(len(longer_words) - 2):
            by_trigram[tuple(longer_words[i : i + 3])].append(phrase)
    return sorted(kept)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def write_base(folder: Path, texts: list[str]) -> None:
    """Tokenizer and model config (no weights): what ``--from-scratch`` pretraining starts from."""
    from transformers import GPT2Config

    tokenizer = train_tokenizer(texts)
    tokenizer.save_pretrained(folder)
    GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **MODEL_CONFIG,
    ).save_pretrained(folder)


def data_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(work: Path, steps: int, export: Path | None, device_note: str = "") -> dict:
    """Run the whole recipe in ``work``; export the result to ``export`` when given."""
    import torch

    from tuneoff.config import SFTConfig
    from tuneoff.train.sft import train

    work.mkdir(parents=True, exist_ok=True)
    texts = corpus(read_phrases())
    data = work / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    base = work / "base"
    write_base(base, texts)
    r = RECIPE
    config = SFTConfig(
        model=str(base),
        data=str(data),
        out=str(work / "run"),
        from_scratch=True,
        packing=True,
        max_steps=steps,
        batch_size=r["batch_size"],
        max_length=r["max_length"],
        lr=r["lr"],
        warmup_ratio=r["warmup_ratio"],
        weight_decay=r["weight_decay"],
        seed=r["seed"],
        eval_fraction=r["eval_fraction"],
        eval_every=max(1, steps // 6),
        save_every=max(1, steps // 6),
        log_every=max(1, steps // 100),
        resume=(work / "run" / "checkpoints").exists(),
    )
    start = time.perf_counter()
    final = train(config)
    seconds = time.perf_counter() - start
    metrics = [json.loads(l) for l in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval/perplexity" in m]
    tokens_per_s = [m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m]
    card = {
        "recipe": {**r, "steps": steps, "model": dict(MODEL_CONFIG), "vocab_size": VOCAB_SIZE},
        "data": {"file": "assets/data/sst2/train.tsv.gz", "sha256": data_hash(SST2_TRAIN), "documents": len(texts)},
        "tokens_seen": steps * r["batch_size"] * r["max_length"],
        "held_out_perplexity": evals[-1]["eval/perplexity"] if evals else None,
        "held_out_loss": evals[-1]["eval/loss"] if evals else None,
        "train_seconds": round(seconds, 1),
        "tokens_per_s": tokens_per_s[-1] if tokens_per_s else None,
        "device": device_note or ("cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
        "torch": torch.__version__,
    }
    if export is not None:
        export_fp16(final, export, card)
    return card


def export_fp16(final: Path, export: Path, card: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float16)
    export.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(export, safe_serialization=True)
    AutoTokenizer.from_pretrained(final).save_pretrained(export)
    (export / "RECIPE.json").write_text(json.dumps(card, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Build review-gpt: corpus, tokenizer, pretraining, fp16 export.")
    parser.add_argument("--work", default="runs/review-gpt", help="working folder (resumable)")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"], help="optimizer steps")
    parser.add_argument("--export", default=str(REVIEW_GPT_DIR), help="where the fp16 weights go ('' to skip)")
    parser.add_argument("--tokenizer-only", action="store_true", help="only write the tokenizer and config to --export")
    args = parser.parse_args()
    if args.tokenizer_only:
        write_base(Path(args.export), corpus(read_phrases()))
        return
    card = build(Path(args.work), args.steps, Path(args.export) if args.export else None)
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
