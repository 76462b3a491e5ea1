"""The fastdiff command: help on every command, info, sample (embedded and saved models), bad input."""

import subprocess
import sys

import pytest

from fastdiff.cli import main

COMMANDS = ["sample", "train", "quality", "compare", "bench", "info"]


def fastdiff(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    result = fastdiff(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: fastdiff" in result.stdout


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastdiff", "torch", "triton", "backend", "usable"):
        assert word in out


@pytest.mark.parametrize("extra", [[], ["--scheduler", "ddpm"], ["--eta", "1", "--class", "2", "--batch", "3"],
                                   ["--backend", "torch", "--guidance", "1"]])
def test_sample_a_saved_model(tiny_model, tmp_path, extra, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_model), "--out", str(out), "--steps", "4", "--no-progress", *extra]) == 0
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out


def test_sample_same_seed_same_png(tiny_model, tmp_path):
    args = ["sample", "--model", str(tiny_model), "--steps", "3", "--no-progress", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("extra, message", [(["--steps", "0"], "num_inference_steps"),
                                            (["--class", "9"], "class_labels"),
                                            (["--model", "nowhere"], "path")])
def test_sample_bad_input_is_a_message_not_a_traceback(tiny_model, extra, message, capsys):
    args = ["sample", "--model", str(tiny_model), "--steps", "2", "--no-progress"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sample_with_no_arguments(tmp_path):
    """The newcomer's command: embedded digits model, DDIM-50, all ten classes, well under a minute."""
    result = fastdiff("sample", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    grid = Image.open(tmp_path / "samples.png")
    assert grid.width > grid.height  # ten columns, four rows
