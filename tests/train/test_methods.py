"""The method table: every method a verb and an experiment arm, and every config field it declares read by it."""

import ast
import dataclasses
from pathlib import Path

import pytest

from tuneoff.train.methods import ARM_METHODS, METHODS, ONLINE

TRAIN = Path(__file__).resolve().parents[2] / "src" / "tuneoff" / "train"
SHARED = ("loop.py", "common.py")
"""What every method's run goes through besides its own module."""


def fields_read(files) -> set[str]:
    """Names X of every ``config.X`` / ``context.config.X`` / ``getattr(config, "X")`` in the files' source."""
    read = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
                owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
                if owner == "config":
                    read.add(node.attr)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                read.add(node.args[1].value)
    return read


def train_modules_used(file: Path) -> set[Path]:
    """``file`` and the tuneoff.train modules it imports, transitively (``reference.py`` for DPO and KTO)."""
    seen, todo = set(), [file]
    while todo:
        current = todo.pop()
        if current in seen or not current.exists():
            continue
        seen.add(current)
        for node in ast.walk(ast.parse(current.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tuneoff.train"):
                parts = node.module.split(".")
                if len(parts) == 3:
                    todo.append(TRAIN / f"{parts[2]}.py")
                else:  # from tuneoff.train import loop, metrics
                    todo += [TRAIN / f"{alias.name}.py" for alias in node.names]
    return seen


@pytest.mark.parametrize("name", list(METHODS))
def test_every_declared_field_is_read_by_the_methods_code_path(name):
    """A field in `tuneoff <verb> --help` does something: its method's loop (with the shared skeleton and, for the
    online methods, the RL pieces) reads it. Fields set in __post_init__ from others count only if read too."""
    method = METHODS[name]
    files = train_modules_used(TRAIN / f"{method.module}.py") | {TRAIN / f for f in SHARED}
    if method.online:
        files.add(TRAIN / "policy.py")
    declared = {f.name for f in dataclasses.fields(method.config)}
    unread = declared - fields_read(files)
    assert not unread, f"{name}: declared but never read: {sorted(unread)}"


def test_the_fields_test_catches_an_unread_field():
    """The check above is not vacuous: a field nobody reads is reported."""
    assert "no_such_field_anywhere" not in fields_read([TRAIN / "sft.py", *(TRAIN / f for f in SHARED)])
    assert {"packing", "completion_only_loss", "max_length", "seed"} <= fields_read([TRAIN / "sft.py"])


def test_every_method_is_a_verb_and_every_trainable_one_an_arm():
    from tuneoff.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    assert set(METHODS) <= set(verbs)
    assert set(ARM_METHODS) == {"base", *(n for n, m in METHODS.items() if m.arm)} and "rm" not in ARM_METHODS
    assert set(ONLINE) == {"ppo", "grpo", "rloo"}
    assert METHODS["kto"].needs_pairs and METHODS["dpo"].needs_pairs and not METHODS["sft"].needs_pairs


def test_flops_per_token_formulas():
    from tuneoff.config import GRPOConfig, PPOConfig, SFTConfig

    n = 1000
    assert METHODS["sft"].flops_per_token(n, SFTConfig()) == 6 * n
    # PPO, 4 epochs: sampling 2n + reference 2n + critic 2n, then policy and critic 6n each per epoch
    assert METHODS["ppo"].flops_per_token(n, PPOConfig(update_epochs=4)) == 6 * n + 48 * n
    assert METHODS["grpo"].flops_per_token(n, GRPOConfig(update_epochs=1)) == 4 * n + 6 * n


def test_an_experiment_arm_of_method_kto_trains_on_the_labelled_pairs(tmp_path):
    from tuneoff.compare.experiment import ExperimentConfig, plan

    config = ExperimentConfig(
        base="tiny", seeds=[0], arms={"base": {"method": "base"}, "kto": {"method": "kto", "max_steps": 3, "beta": 0.2}}
    )
    jobs = {j.name: j for j in plan(config, tmp_path)}
    assert "pairs" in jobs and "rm" not in jobs
    assert jobs["train:kto/seed-0"].deps == ["pairs"]
    with pytest.raises(Exception, match="unknown field"):
        ExperimentConfig(base="tiny", seeds=[0], arms={"kto": {"method": "kto", "kl_coef": 0.1}})
