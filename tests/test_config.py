import argparse

import pytest

from tuneoff.config import SFTConfig, add_config_arguments, build_config, field_docs
from tuneoff.errors import TuneoffError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SFTConfig)
    return parser.parse_args(argv)


def test_every_field_has_a_docstring():
    import dataclasses

    docs = field_docs(SFTConfig)
    assert {f.name for f in dataclasses.fields(SFTConfig)} <= set(docs)
    assert docs["packing"].startswith("Pack several short examples")


def test_precedence_default_yaml_flags(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 0.001\nbatch_size: 4\npacking: true\nmax-steps: 7\n")
    config = build_config(SFTConfig, parse(["--config", str(config_file), "--batch-size", "2", "--no-packing"]))
    assert (config.lr, config.batch_size, config.packing, config.max_steps) == (0.001, 2, False, 7)
    assert config.seed == 0  # untouched default


def test_yaml_unknown_key_and_wrong_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(TuneoffError, match="unknown field 'learning_rate'"):
        build_config(SFTConfig, parse(["--config", str(bad)]))
    bad.write_text("batch_size: four\n")
    with pytest.raises(TuneoffError, match="field 'batch_size': expected int"):
        build_config(SFTConfig, parse(["--config", str(bad)]))


def test_invalid_values_rejected():
    with pytest.raises(TuneoffError, match="schedule"):
        SFTConfig(schedule="exp")
    with pytest.raises(TuneoffError, match="batch_size"):
        SFTConfig(batch_size=0)


def test_device_and_precision_choices(tmp_path):
    assert (SFTConfig().device, SFTConfig().precision) == ("auto", "auto")
    with pytest.raises(TuneoffError, match="device must be auto, cpu or cuda, got 'gpu'"):
        SFTConfig(device="gpu")
    with pytest.raises(TuneoffError, match="precision must be auto, fp32, bf16 or fp16, got 'fp8'"):
        SFTConfig(precision="fp8")
    with pytest.raises(TuneoffError, match="precision"):
        build_config(SFTConfig, parse(["--precision", "half"]))
    config_file = tmp_path / "c.yaml"
    config_file.write_text("device: cpu\nprecision: bf16\n")
    config = build_config(SFTConfig, parse(["--config", str(config_file)]))
    assert (config.device, config.precision) == ("cpu", "bf16")


def test_sft_help_lists_device_and_precision(capsys):
    from tuneoff.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sft", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE Where to train: auto" in text and "(default: 'auto')" in text
    assert "--precision PRECISION Autocast precision" in text
