"""Configuration: presets load and validate; flags and aliases; each bad config has its own message."""

import argparse
import re
from pathlib import Path
from typing import get_args

import pytest

from repa.config import (
    SECTIONS,
    ExperimentConfig,
    PathType,
    add_config_arguments,
    config_from_args,
    config_reference_markdown,
    iter_options,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("preset", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_presets_load_and_validate(preset):
    config = parse(["--config", str(preset), "--data", "shards"])
    assert config.data.data == "shards"


def test_defaults_are_repas():
    config = parse([])
    assert (config.model.name, config.model.align_depth, config.model.proj_coeff) == ("SiT-XL/2", 8, 0.5)
    assert config.encoder.encoder == "dinov2-b" and config.method == "repa"
    assert config.data.batch_size == 256 and config.optim.learning_rate == 1e-4


def test_field_flags_work_as_written():
    config = parse("--model SiT-B/2 --encoder dinov2-b --align-depth 4 --proj-coeff 0.25".split())
    assert (config.model.name, config.model.align_depth, config.model.proj_coeff) == ("SiT-B/2", 4, 0.25)
    assert parse(["--encoder", "none"]).method == "sit"


def test_repa_aliases():
    config = parse(
        "--enc-type dinov2-vit-b --encoder-depth 6 --data-dir d --cfg-prob 0.2 --weighting lognormal".split()
    )
    assert config.encoder.encoder == "dinov2-vit-b" and config.model.align_depth == 6
    assert config.data.data == "d" and config.model.class_dropout_prob == 0.2
    assert config.transport.time_sampler == "lognormal"
    assert parse(["--resume-step", "500"]).run.resume == "step:500"


def test_flags_override_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: {name: SiT-B/2, align_depth: 4}\nrun: {seed: 3}\n")
    config = parse(["--config", str(preset), "--align-depth", "2"])
    assert (config.model.name, config.model.align_depth, config.run.seed) == ("SiT-B/2", 2, 3)


def test_booleans():
    assert parse(["--random-flip"]).data.random_flip is True
    assert parse(["--random-flip", "false"]).data.random_flip is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--align-depth", "0"], "align depth 0 is out of range"),
        (["--align-depth", "29"], "choose 1..28"),
        (["--model", "SiT-XXL/2"], "unknown model"),
        (["--method", "repa", "--encoder", "none"], "aligns to an encoder"),
        (["--method", "sit"], "--encoder none"),
        (["--method", "repa-e", "--tokenizer", "pixels"], "choose a VAE tokenizer"),
        (["--proj-coeff", "-1"], "--proj-coeff must be >= 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--batch-size", "10", "--gradient-accumulation-steps", "3"], "not divisible"),
        (["--resolution", "100"], "multiple of 8"),
        (["--keep-checkpoints", "1"], "must be >= 2"),
        (["--cfg-prob", "1.5"], "class-dropout-prob"),
        (["--ema-decay", "2"], "ema-decay"),
        (["--learning-rate", "0"], "learning-rate"),
        (["--encoder", "dinov2-b,clip-l", "--encoder-weights", "w.pt"], "names one file"),
    ],
)
def test_each_bad_config_has_its_own_message(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_bad_preset_keys_and_sections(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("model: {nmae: SiT-B/2}\n")
    with pytest.raises(ValueError, match="unknown key.*nmae.*section 'model'"):
        parse(["--config", str(bad_key)])
    bad_section = tmp_path / "b.yaml"
    bad_section.write_text("modle: {name: SiT-B/2}\n")
    with pytest.raises(ValueError, match="unknown config section"):
        parse(["--config", str(bad_section)])
    with pytest.raises(FileNotFoundError, match="configs/"):
        parse(["--config", str(tmp_path / "missing.yaml")])


# Every field with a fixed set of values: flag, section, key, a bad value, the bad item, the valid values.
FIXED_SETS = [
    ("--adaln", "model", "adaln", "shared", "shared", "block, single"),
    ("--null-context", "model", "null_context", "zeros", "zeros", "empty, learned, fixed"),
    ("--path-type", "transport", "path_type", "cosin", "cosin", "linear, cosine"),
    (
        "--time-sampler",
        "transport",
        "time_sampler",
        "beta",
        "beta",
        "uniform, logit-normal, lognormal, logit_normal",
    ),
    ("--lr-schedule", "optim", "lr_schedule", "linear", "linear", "constant, cosine"),
    ("--mixed-precision", "run", "mixed_precision", "fp8", "fp8", "auto, no, fp32, bf16, fp16"),
    ("--wandb-mode", "run", "wandb_mode", "disabled", "disabled", "online, offline"),
    ("--report-to", "run", "report_to", "wandb,mlflow", "mlflow", "wandb, tensorboard"),
    ("--eval-metrics", "run", "eval_metrics", "fid, kid", "kid", "fid, sfid, is, prc, fd-dinov2, fd"),
    ("--align-target", "objective", "align_target", "random", "random", "encoder, shuffled"),
    ("--projector", "objective", "projector", "linear", "linear", "mlp, conv"),
    ("--target-norm", "objective", "target_norm", "layernorm", "layernorm", "none, zscore"),
    ("--sra-cosine", "objective", "sra_cosine", "per-channel", "per-channel", "per-token, token-axis"),
]
FIXED_IDS = [case[0] for case in FIXED_SETS]


def not_one_of(flag, section, key, item, valid):
    return f"{flag} {item!r} is not one of: {valid} (config key {section}.{key})"


def test_every_fixed_set_field_is_tested():
    from repa.config import _choices

    typed = {(section, f.name) for section, f in iter_options() if _choices(SECTIONS[section], f.name)}
    assert typed == {(section, key) for _, section, key, *_ in FIXED_SETS}


@pytest.mark.parametrize("flag, section, key, bad, item, valid", FIXED_SETS, ids=FIXED_IDS)
def test_a_bad_flag_value_names_the_flag_and_the_valid_values(flag, section, key, bad, item, valid, capsys):
    with pytest.raises(SystemExit):
        parse([flag, bad])
    assert not_one_of(flag, section, key, item, valid) in capsys.readouterr().err


@pytest.mark.parametrize("flag, section, key, bad, item, valid", FIXED_SETS, ids=FIXED_IDS)
def test_a_bad_preset_value_gives_the_same_message(flag, section, key, bad, item, valid, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"{section}: {{{key}: '{bad}'}}\n")
    with pytest.raises(ValueError, match=re.escape(not_one_of(flag, section, key, item, valid))):
        parse(["--config", str(preset)])


@pytest.mark.parametrize("flag, section, key, bad, item, valid", FIXED_SETS, ids=FIXED_IDS)
def test_a_bad_from_dict_value_gives_the_same_message(flag, section, key, bad, item, valid):
    with pytest.raises(ValueError, match=re.escape(not_one_of(flag, section, key, item, valid))):
        ExperimentConfig.from_dict({section: {key: bad}})


@pytest.mark.parametrize("flag, section, key, bad, item, valid", FIXED_SETS, ids=FIXED_IDS)
def test_every_valid_value_is_accepted(flag, section, key, bad, item, valid):
    for value in valid.split(", "):
        assert getattr(getattr(parse([flag, value]), section), key) == value
        assert getattr(getattr(ExperimentConfig.from_dict({section: {key: value}}), section), key) == value


def test_comma_lists_take_several_or_no_items():
    config = parse(["--report-to", "wandb, tensorboard", "--eval-metrics", "fid,is,prc"])
    assert (config.run.report_to, config.run.eval_metrics) == ("wandb, tensorboard", "fid,is,prc")
    assert parse(["--report-to", ""]).run.report_to == ""


def test_parser_choices_come_from_the_literal():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    action = next(a for a in parser._actions if "--path-type" in a.option_strings)
    assert tuple(action.choices) == get_args(PathType) == ("linear", "cosine")


def test_yaml_booleans_in_a_fixed_set_field_say_to_quote(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("run: {mixed_precision: no}\n")  # YAML 1.1 reads an unquoted no as false
    with pytest.raises(ValueError, match="--mixed-precision False is not one of: .*quote the value"):
        parse(["--config", str(preset)])


def test_torch_free_value_lists_equal_their_sources():
    from repa.config import EVAL_METRICS, PRECISIONS, TIME_SAMPLER_NAMES
    from repa.eval.metrics import METRICS
    from repa.precision import CHOICES
    from repa.transport.objective import TIME_SAMPLER_ALIASES, TIME_SAMPLERS

    assert (*TIME_SAMPLERS, *TIME_SAMPLER_ALIASES) == TIME_SAMPLER_NAMES
    assert tuple(METRICS) == EVAL_METRICS
    assert CHOICES == PRECISIONS


def test_round_trip_through_dict():
    config = parse(["--model", "SiT-L/2", "--seed", "7"])
    assert ExperimentConfig.from_dict(config.to_dict()) == config


def test_reference_lists_every_flag():
    table = config_reference_markdown()
    for flag in ("--model", "--encoder", "--align-depth", "--proj-coeff", "--batch-size", "--resume"):
        assert f"`{flag}`" in table
    assert "`--encoder-depth`" in table and "`--enc-type`" in table


def test_yaml_values_are_coerced_to_field_types(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim: {learning_rate: 1e-4, adam_epsilon: 1e-08}\nrun: {max_train_steps: 1e5}\n")
    config = parse(["--config", str(preset)])
    assert config.optim.learning_rate == 1e-4 and config.optim.adam_epsilon == 1e-8
    assert config.run.max_train_steps == 100000
    preset.write_text("optim: {learning_rate: fast}\n")
    with pytest.raises(ValueError, match="optim.learning_rate.*'fast'"):
        parse(["--config", str(preset)])


def test_readme_reference_is_generated_from_the_config():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert config_reference_markdown() in readme, "README out of date: paste `python -m repa.config` into it"


def test_learning_rate_schedules():
    from repa.train.optim import lr_at

    config = parse(["--learning-rate", "1e-3", "--lr-warmup-steps", "10", "--max-train-steps", "110"])
    assert [lr_at(s, config) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(50, config) == pytest.approx(1e-3)  # constant after warmup
    config = parse(["--learning-rate", "1e-3", "--lr-warmup-steps", "10", "--max-train-steps", "110",
                    "--lr-schedule", "cosine"])  # fmt: skip
    assert lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(5e-4)  # half way through the cosine
    assert lr_at(110, config) == pytest.approx(0.0, abs=1e-12)
