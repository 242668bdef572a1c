"""`latent-codec`: one tree, one flag vocabulary (checked by walking the parser), one error wrapper, presets by name."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from latent_codec import cli
from latent_codec.cli_doc import markdown, verb_parsers

ROOT = Path(__file__).resolve().parents[1]
VERBS = verb_parsers()
# Each of these means one thing in every verb that has it; the metavar says what it takes.
MEANING = {"--codec": "DIR", "--pipeline": "DIR", "--shards": "DIR", "--out": "DIR", "--entropy-model": "FILE"}
# Spellings the vocabulary replaced: one word for each thing, steps always qualified.
RETIRED = {"--model", "--steps", "--step", "--output-dir", "--height", "--width", "--size", "--dtype", "--step-min",
           "--step-max"}
# The verbs that train, fit or encode: each takes --config and --set.
CONFIGURED = {"codec train", "unet train", "shards encode", "entropy fit"}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_the_tree_has_every_stage_of_the_mission():
    assert list(VERBS) == ["codec train", "codec evaluate", "codec export", "shards encode", "shards verify",
                           "shards convert", "unet train", "generate", "compress", "decompress", "entropy fit",
                           "analyze latents", "analyze rate-distortion", "analyze plot-rd"]


@pytest.mark.parametrize("words", list(VERBS))
def test_every_flag_means_one_thing_and_is_explained(words):
    flags = options(VERBS[words])
    assert RETIRED.isdisjoint(flags), f"{words}: retired spelling {sorted(RETIRED & set(flags))}"
    for flag, kind in MEANING.items():
        if flag in flags:
            assert kind in (flags[flag].metavar or ""), f"{words} {flag}: metavar {flags[flag].metavar!r}"
    steps = [f for f in flags if "step" in f]
    assert set(steps) <= {"--max-steps", "--sample-steps"}, f"{words}: {steps}"
    sizes = [f for f in flags if any(w in f for w in ("size", "height", "width", "resolution"))]
    assert set(sizes) <= {"--resolution", "--batch-size", "--tile-size", "--unit-size"}, f"{words}: {sizes}"
    assert not [f for f in flags if "dtype" in f], words
    if words in CONFIGURED:
        assert {"--config", "--set"} <= set(flags), words
    unexplained = [a.dest for a in VERBS[words]._actions if not a.help]
    assert unexplained == [], f"{words}: no help for {unexplained}"


def test_the_vocabulary_check_catches_a_retired_flag():
    """The walk is not vacuous: a parser with an old spelling fails it."""
    parser = cli.Parser(prog="x")
    parser.add_argument("--output-dir", help="h")
    assert RETIRED & set(options(parser)) == {"--output-dir"}


@pytest.mark.parametrize("words", ["", *VERBS, *[g for g, v in cli.TREE.items() if isinstance(v, dict)]])
def test_help_exits_0_at_every_level(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*words.split(), "--help"])
    assert exit_.value.code == 0
    assert "usage: latent-codec" in capsys.readouterr().out


def test_a_mistake_is_one_line_naming_the_input_and_exit_2(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-such-codec"
    assert cli.main(["codec", "export", "--codec", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and err.startswith("latent-codec codec export: error:")

    # A Hub dataset that cannot be reached (offline here) is the user's input too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    assert cli.main(["codec", "train", "--config", "tiny", "--data", "nobody-xyz/no-such-dataset-123",
                     "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not load dataset 'nobody-xyz/no-such-dataset-123'" in err

    with pytest.raises(SystemExit) as exit_:  # argparse's own errors: the same one line, the same status
        cli.main(["codec", "export", "--codec", "c", "--out", "o", "--no-such-flag"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-such-flag" in err


def test_a_bug_is_not_hidden_as_a_user_error(capsys):
    """Only the errors a user can cause become one line; anything else keeps its traceback."""
    def broken(args):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        cli.run_command(broken, argparse.Namespace(), "latent-codec x")


def test_presets_are_found_by_name_and_by_path(tmp_path):
    from codec.training.config import load_codec_config
    from diffusion.config import load_unet_config

    assert {"tiny", "small", "kl-f8", "f8c16"} <= set(cli.preset_names("codec"))
    by_name = load_codec_config(cli.config_path("tiny", "codec"))
    by_path = load_codec_config(cli.config_path(str(ROOT / "configs" / "codec" / "tiny.yaml"), "codec"))
    assert by_name == by_path
    assert load_unet_config(cli.config_path("sd", "unet")).unet.block_out_channels == [320, 640, 1280, 1280]
    with pytest.raises(cli.CommandError, match="small, tiny"):
        cli.config_path("smal", "codec")


def test_resolution_is_one_spelling_for_squares_and_rectangles():
    assert cli.resolution("512") == (512, 512)
    assert cli.resolution("768x512") == (768, 512)
    for bad in ("0", "12x", "axb", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.resolution(bad)


def test_docs_cli_md_is_the_parser_s_help():
    page = ROOT / "docs" / "cli.md"
    assert page.read_text() == markdown(), "docs/cli.md is stale: python -m latent_codec.cli_doc > docs/cli.md"


def test_the_installed_command_and_a_single_verb_module_run(tmp_path):
    """`latent-codec` from the console script, and `python -m latent_codec.commands.<verb>` as accelerate launch -m
    runs it: the same parser and errors."""
    command = Path(sys.executable).with_name("latent-codec")
    out = subprocess.run([str(command), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "codec" in out.stdout and "analyze" in out.stdout
    alone = subprocess.run([sys.executable, "-m", "latent_codec.commands.codec_export", "--codec",
                            str(tmp_path / "none"), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                           cwd=tmp_path)
    assert alone.returncode == 2
    assert alone.stderr.startswith("latent-codec codec export: error:") and alone.stderr.count("\n") == 1


def test_settings_come_from_defaults_then_config_then_set_then_flags(tmp_path):
    """shards encode and entropy fit: the same precedence as the trainers, and unknown keys refused."""
    from codec.common.config import ConfigError
    from codec.shards.config import load_encode_config

    path = tmp_path / "encode.yaml"
    path.write_text("unit_size: 3\nseed: 5\nbatch_size: 2\n")
    args = argparse.Namespace(config=str(path), set=["seed=6", "crop=random"], batch_size=8, seed=None)
    cfg = cli.settings_with_flags(load_encode_config, args, "shards")
    assert (cfg.unit_size, cfg.seed, cfg.crop, cfg.batch_size, cfg.resolution) == (3, 6, "random", 8, 512)
    path.write_text("unit_sise: 3\n")
    with pytest.raises(ConfigError, match="unit_sise"):
        cli.settings_with_flags(load_encode_config, args, "shards")
    assert cli.main(["entropy", "fit", "--shards", str(tmp_path), "--out", str(tmp_path / "m"), "--config",
                     "no-such-preset"]) == 2
