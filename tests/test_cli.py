"""The fastdiff command: help on every command, info, sample (embedded and saved models), bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

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


@pytest.mark.parametrize("extra", [[], ["--scheduler", "ddpm"], ["--eta", "1", "--class", "2", "--batch-size", "3"],
                                   ["--backend", "torch", "--guidance", "1"]])
def test_sample_a_saved_model(tiny_model, tmp_path, extra, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_model), "--out", str(out), "--steps", "4", "--no-progress", *extra]) == 0
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out


def pipeline_calls(monkeypatch, read) -> list:
    """``read(pipe)`` at each DiffusionPipeline call from here on, in a list that fills as the CLI samples."""
    from fastdiff import DiffusionPipeline

    seen, call = [], DiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(read(self))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "__call__", spy)
    return seen


def test_sample_takes_scheduler_options(tiny_model, tmp_path, monkeypatch):
    configs = pipeline_calls(monkeypatch, lambda pipe: pipe.scheduler.config)
    assert main(["sample", "--model", str(tiny_model), "--out", str(tmp_path / "grid.png"), "--steps", "3",
                 "--no-progress", "--scheduler", "dpm++", "--scheduler-option", "timestep_spacing=trailing",
                 "--scheduler-option", "solver_order=3", "--scheduler-option", "use_karras_sigmas=false"]) == 0
    (config,) = configs
    assert (config.timestep_spacing, config.solver_order, config.use_karras_sigmas) == ("trailing", 3, False)


@pytest.mark.parametrize("option, message", [
    ("solver_order=3", "--scheduler-option: DDIMScheduler takes no option 'solver_order'"),
    ("timestep_spacing", "--scheduler-option must look like KEY=VALUE"),
    ("timestep_spacing=sideways", "timestep_spacing must be one of 'leading', 'trailing', 'linspace'"),
])
def test_sample_refuses_a_bad_scheduler_option_in_one_line(tiny_model, tmp_path, option, message, capsys):
    assert main(["sample", "--model", str(tiny_model), "--out", str(tmp_path / "grid.png"), "--steps", "3",
                 "--no-progress", "--scheduler-option", option]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "grid.png").exists()


def test_parse_options_reads_json_values_else_strings():
    from fastdiff.schedulers import parse_options

    assert parse_options(["a=true", "b=3", "c=0.5", "d=trailing", "e=null", "f=[1, 2]", "g=x=y"]) == \
        {"a": True, "b": 3, "c": 0.5, "d": "trailing", "e": None, "f": [1, 2], "g": "x=y"}
    assert parse_options(None) == {}


def test_sample_same_seed_same_png(tiny_model, tmp_path):
    args = ["sample", "--model", str(tiny_model), "--steps", "3", "--no-progress", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_sample_channels_last_runs_the_unet_in_channels_last(tiny_model, tmp_path, monkeypatch):
    layouts = pipeline_calls(monkeypatch, lambda pipe: pipe.unet.memory_format)
    args = ["sample", "--model", str(tiny_model), "--steps", "3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "nchw.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "nhwc.png"), "--channels-last"]) == 0
    assert main([*args, "--outdir", str(tmp_path / "set"), "--num-images", "2", "--channels-last"]) == 0
    assert layouts == [torch.contiguous_format, torch.channels_last, torch.channels_last]
    nchw, nhwc = (np.asarray(Image.open(tmp_path / name), dtype=int) for name in ("nchw.png", "nhwc.png"))
    assert np.abs(nchw - nhwc).max() <= 1  # the same images up to convolution rounding


@pytest.mark.parametrize("extra, message", [(["--steps", "0"], "argument --steps"),
                                            (["--class", "9"], "class_labels"),
                                            (["--model", "nowhere"], "path")])
def test_sample_bad_input_is_a_message_not_a_traceback(tiny_model, extra, message, capsys):
    args = ["sample", "--model", str(tiny_model), "--steps", "2", "--no-progress"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sample_cuda_graph_on_a_cpu_is_a_message_not_a_traceback(tiny_model, tmp_path):
    result = fastdiff("sample", "--model", str(tiny_model), "--device", "cpu", "--steps", "2", "--no-progress",
                      "--cuda-graph", cwd=tmp_path)
    assert result.returncode == 2
    assert "fastdiff sample: error: --cuda-graph needs a CUDA device" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "samples.png").exists()


def test_sample_many_cuda_graph_on_a_cpu_is_refused_before_sampling(tiny_model, tmp_path, capsys):
    args = ["sample", "--model", str(tiny_model), "--device", "cpu", "--steps", "2", "--no-progress", "--cuda-graph"]
    assert main([*args, "--num-images", "2", "--outdir", str(tmp_path / "set")]) == 2
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()


@pytest.mark.gpu
def test_sample_cuda_graph_draws_the_same_png(tiny_model, tmp_path):
    """Graph replays launch the same kernels on the same inputs as the eager loop: the same bytes.
    DDPM draws noise every step (from the CLI's CPU generator), DDIM with eta 0 never."""
    for scheduler in ("ddim", "ddpm"):
        args = ["sample", "--model", str(tiny_model), "--device", "cuda", "--steps", "5", "--no-progress",
                "--scheduler", scheduler]
        assert main([*args, "--out", str(tmp_path / f"{scheduler}-eager.png")]) == 0
        assert main([*args, "--out", str(tmp_path / f"{scheduler}-graph.png"), "--cuda-graph"]) == 0
        eager, graph = ((tmp_path / f"{scheduler}-{kind}.png").read_bytes() for kind in ("eager", "graph"))
        assert eager == graph, scheduler
    # an evaluation set: batches of 3 and a short last batch of 2, each with its own graph
    args = ["sample", "--model", str(tiny_model), "--device", "cuda", "--steps", "5", "--no-progress",
            "--num-images", "5", "--batch-size", "3"]
    assert main([*args, "--outdir", str(tmp_path / "eager")]) == 0
    assert main([*args, "--outdir", str(tmp_path / "graph"), "--cuda-graph"]) == 0
    for i in range(5):
        name = f"{i:06d}.png"
        assert (tmp_path / "eager" / name).read_bytes() == (tmp_path / "graph" / name).read_bytes(), name


def test_sample_with_no_arguments(tmp_path):
    """The newcomer's command: embedded digits model, DDIM-50, all ten classes, well under a minute."""
    result = fastdiff("sample", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    grid = Image.open(tmp_path / "samples.png")
    assert grid.width > grid.height  # ten columns, four rows
