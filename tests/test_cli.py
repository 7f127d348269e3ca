import argparse
import inspect
from dataclasses import dataclass, fields

import pytest

from cli import parse_configs
from sampling import SampleConfig


@dataclass
class A:
    epochs: int = 20  # passes
    lr: float = 1e-4  # learning rate
    amp: bool = False  # autocast
    name: str | None = None  # optional


@dataclass
class B:
    mult: tuple[int, ...] = (1, 2)  # multipliers


def test_precedence_defaults_preset_flags():
    presets = {"small": dict(epochs=2, mult=(1,))}
    (a, b), preset = parse_configs([A(), B()], presets, "small", ["--lr", "0.5", "--amp", "--mult", "1,2,4"])
    assert preset == "small" and a == A(epochs=2, lr=0.5, amp=True) and b.mult == (1, 2, 4)
    (a, b), preset = parse_configs([A(), B()], presets, None, ["--name", "x"])
    assert preset is None and a == A(name="x") and b == B()


def test_unknown_flag_and_preset_exit(capsys):
    with pytest.raises(SystemExit):
        parse_configs([A()], {"small": {}}, None, ["--preset", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_configs([A()], None, None, ["--epoch", "3", "--bogus"])


def test_a_bad_value_says_what_the_flag_takes(capsys):
    with pytest.raises(SystemExit):
        parse_configs([B()], None, None, ["--mult", "x"])
    assert "argument --mult: invalid comma-separated integers (e.g. 1,2,4) value: 'x'" in capsys.readouterr().err


def test_help_shows_one_default_per_flag_and_groups_each_config(capsys):
    with pytest.raises(SystemExit):
        parse_configs([A(), SampleConfig()], None, None, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "passes (default: 20)" in text and "(default: the recorded one)" in text
    assert text.count("default:") == len(fields(A)) + len(fields(SampleConfig))
    assert "How to sample: the flags of every script that draws from a checkpoint:" in text


def test_the_weights_choice_has_one_spelling_and_the_old_one_still_works(capsys):
    import mnist_test
    import reflow
    from cli import add_weights_flag

    p = argparse.ArgumentParser()
    add_weights_flag(p)
    assert p.parse_args([]).weights == "ema" and p.parse_args(["--weights", "raw"]).weights == "raw"
    assert p.parse_args(["--raw-weights"]).weights == "raw"
    assert "--raw-weights is now --weights raw" in capsys.readouterr().err
    for module in (mnist_test, reflow):
        assert "add_weights_flag(" in inspect.getsource(module) and "\"--raw-weights\"" not in inspect.getsource(module)


def test_help_names_the_command_and_each_presets_value_as_the_default(capsys):
    import mnist_train
    import reflow

    with pytest.raises(SystemExit):
        reflow.main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: reflow.py distill") and "(default: parent)" not in text
    with pytest.raises(SystemExit):
        mnist_train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.004 with --preset cpu; 0.0002 with --preset gpu" in text and "(1, 2, 2)" not in text
    assert "(default: none with --preset cpu; 14,7 with --preset gpu" in text  # --attention-resolutions
