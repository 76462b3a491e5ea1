"""fastdiff compare: the fast (Triton) and reference (torch) paths from one seed, step by step.

On a CPU the kernels run through Triton's interpreter, so every sampling run here is a tiny model
(8×8, channels (8, 16)) for one or two steps; the interpreter spends ~1 s per image per step.
The tool is only worth something if it can see a difference: one test makes the DDIM kernel
deliberately wrong by 1e-2 and checks that the report shows exactly that.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys

import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff import backend
from fastdiff.compare import (ComparisonResult, ErrorStats, StepError, _verdict, add_arguments, compare,
                              error_stats, format_table, prepare_interpreter, run, table_rows)

needs_fast_path = pytest.mark.skipif(
    not (backend.triton_available() and (torch.cuda.is_available() or backend.interpreter_enabled())),
    reason="the triton backend needs triton, and CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = 8  # the tiny model's sample_size (tests/conftest.py)
PERTURBATION = 1e-2


def cli(*argv: str) -> int:
    """``fastdiff compare ARGV`` without the top-level parser (cli.py wires the same two functions)."""
    return run(add_arguments(argparse.ArgumentParser()).parse_args(list(argv)))


# ----------------------------------------------------------------------------- the error measures
def test_error_stats_by_hand():
    reference = torch.tensor([[0.0, 2.0], [-4.0, 1.0]], dtype=torch.float64)
    fast = reference + torch.tensor([[1e-3, 0.0], [-3e-3, 0.0]], dtype=torch.float64)
    stats = error_stats(fast, reference)
    assert stats.max_abs == pytest.approx(3e-3, rel=1e-9)
    assert stats.mean_abs == pytest.approx(1e-3, rel=1e-9)
    # relative to the reference's scale (max |b| = 4): the 1e-3 error on the 0.0 element does not explode
    assert stats.max_rel == pytest.approx(3e-3 / 4, rel=1e-9)


def test_error_stats_edge_cases():
    zeros = torch.zeros(3)
    assert error_stats(zeros, zeros) == ErrorStats(0.0, 0.0, 0.0)
    assert error_stats(torch.tensor([0.0, 1.0, 0.0]), zeros).max_rel == math.inf
    with_nan = error_stats(torch.tensor([0.0, math.nan, 1.0]), torch.ones(3))
    assert all(math.isnan(v) for v in (with_nan.max_abs, with_nan.mean_abs, with_nan.max_rel))
    with pytest.raises(ValueError, match="shape"):
        error_stats(torch.zeros(2), torch.zeros(3))


def synthetic_result(num_steps: int, worst: int) -> ComparisonResult:
    steps = [StepError(i, 1000 - 10 * i, ErrorStats(1e-7, 1e-8, 1e-7 if i != worst else 5e-3),
                       ErrorStats(2e-7, 2e-8, 2e-7)) for i in range(num_steps)]
    return ComparisonResult(
        scheduler="ddpm", num_inference_steps=num_steps, batch_size=1, seed=0, eta=0.0, guidance_scale=None,
        class_labels=None, device="cpu", device_name="CPU", dtype="float32", interpreter=True, steps=steps,
        image=ErrorStats(0.0, 0.0, 0.0), pixels_changed=0, pixels_total=64, fast_seconds=[], reference_seconds=[])


def test_long_runs_print_a_sample_of_steps_with_the_worst_and_the_last():
    result = synthetic_result(100, worst=37)
    rows = [s.step for s in table_rows(result)]
    assert 37 in rows and rows[0] == 0 and rows[-1] == 99 and len(rows) <= 12
    text = format_table(result)
    assert "  37* " in text and "of 100 steps shown" in text
    assert [s.step for s in table_rows(synthetic_result(20, worst=3))] == list(range(20))
    assert result.worst_step.step == 37 and result.speedup is None


def test_nan_is_the_worst_step_fails_the_tolerance_and_survives_strict_json(capsys):
    result = synthetic_result(5, worst=1)
    result.steps[3].x_t = ErrorStats(math.nan, math.nan, math.nan)
    assert result.worst_step.step == 3
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["steps"][3]["x_t"]["max_rel"] == "nan" and data["worst_step"] == 3
    assert "fast_images" not in data and data["speedup"] is None
    assert _verdict(result, tolerance=1.0) == 1 and "step 3" in capsys.readouterr().err
    assert _verdict(result, tolerance=None) == 0


# ----------------------------------------------------------------------------- sampling both paths
@needs_fast_path
def test_fp32_paths_agree_and_the_fast_one_runs_the_kernels(launches, tiny_pipeline):
    pipe = tiny_pipeline(DEVICE)
    result = compare(pipe, num_inference_steps=2, batch_size=1, seed=3, class_labels=[2], guidance_scale=2.0,
                     eta=0.5, scheduler="ddim", repeats=0)  # guided: the U-Net sees a batch of 2
    # one fast run, one ddim_step launch per step: the reference run launched no kernel
    assert launches["ddim_step"] == 2 and launches["group_norm"] > 0 and launches["attention"] > 0
    pipe.scheduler.set_timesteps(2)
    assert [s.timestep for s in result.steps] == pipe.scheduler.timesteps.tolist()
    assert [s.step for s in result.steps] == [0, 1]
    for step in result.steps:
        assert step.x_t.max_rel < 1e-4 and step.x0.max_rel < 1e-4
        assert 0 <= step.x_t.mean_abs <= step.x_t.max_abs
    assert result.image.max_abs < 1e-4 and result.fast_images.shape == (1, 1, SIZE, SIZE)
    assert result.guidance_scale == 2.0 and result.class_labels == [2] and result.speedup is None
    assert json.loads(json.dumps(result.to_dict()))["steps"][1]["timestep"] == result.steps[1].timestep


@needs_fast_path
def test_a_perturbed_kernel_shows_in_the_report(tiny_model, tmp_path, monkeypatch, capsys):
    """The DDIM kernel's x_t made wrong by 1e-2: compare must report 1e-2 at step 0, in x_t and not
    in that step's x0, and --tolerance must turn it into exit status 1."""
    module = importlib.import_module("fastdiff.kernels.scheduler_step")
    exact = module.ddim_step

    def off_by_a_little(*args, **kwargs):
        prev_sample, pred_original_sample = exact(*args, **kwargs)
        return prev_sample + PERTURBATION, pred_original_sample

    monkeypatch.setattr(module, "ddim_step", off_by_a_little)
    out = tmp_path / "perturbed.json"
    assert cli("--model", str(tiny_model), "--steps", "2", "--batch-size", "1", "--guidance", "1", "--repeats", "0",
               "--device", DEVICE, "--json", str(out), "--tolerance", "1e-3", "--no-progress") == 1
    assert "exceeds --tolerance" in capsys.readouterr().err
    first = json.loads(out.read_text())["steps"][0]
    assert first["x_t"]["max_abs"] == pytest.approx(PERTURBATION, rel=1e-3)
    assert first["x_t"]["mean_abs"] == pytest.approx(PERTURBATION, rel=1e-3)
    assert first["x0"]["max_abs"] < 1e-5  # x0 of step 0 comes before the perturbed update


@needs_fast_path
def test_cli_prints_the_table_and_writes_json_and_png(tiny_model, tmp_path, capsys):
    json_path, png_path = tmp_path / "result.json", tmp_path / "result.png"
    assert cli("--model", str(tiny_model), "--scheduler", "ddpm", "--steps", "2", "--batch-size", "1", "--guidance", "1",
               "--repeats", "1", "--device", DEVICE, "--json", str(json_path), "--png", str(png_path),
               "--tolerance", "1e-4", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "x_t max|Δ|" in out and "DDPM-2" in out and "speed-up" in out
    assert ("Triton's CPU interpreter" in out) == (DEVICE == "cpu")
    data = json.loads(json_path.read_text())
    assert len(data["steps"]) == 2 and data["scheduler"] == "ddpm" and data["dtype"] == "float32"
    assert len(data["fast_seconds"]) == len(data["reference_seconds"]) == 1
    assert data["speedup"] == pytest.approx(data["reference_time"] / data["fast_time"])
    assert {"torch", "triton", "fastdiff", "kernel_ops", "created", "model"} <= data.keys()
    scale = 64 // SIZE  # rows of fast | reference | |diff|, one per image, padded by 1 px
    assert Image.open(png_path).size == (scale * (3 * (SIZE + 1) + 1), scale * (SIZE + 2))


def _has_compare_command() -> bool:
    from fastdiff.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "compare" in commands.choices


@needs_fast_path
@pytest.mark.skipif(not _has_compare_command(), reason="fastdiff/cli.py has no compare subcommand yet")
def test_fastdiff_compare_command(tiny_model, capsys):
    from fastdiff.cli import main

    assert main(["compare", "--model", str(tiny_model), "--steps", "1", "--batch-size", "1", "--guidance", "1",
                 "--repeats", "0", "--device", DEVICE, "--no-progress"]) == 0
    assert "not timed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input, set-up
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(repeats=-1), ValueError, "repeats"),
    (dict(scheduler="heun"), ValueError, "scheduler"),
    (dict(seed="0"), TypeError, "seed"),
    (dict(num_inference_steps=2.0), TypeError, "num_inference_steps"),
])
def test_bad_arguments_are_named(kwargs, error, message, tiny_pipeline):
    args = dict(num_inference_steps=1, batch_size=1, repeats=0) | kwargs
    with pytest.raises(error, match=message):
        compare(tiny_pipeline(DEVICE), **args)


def test_pipe_must_be_a_pipeline():
    with pytest.raises(TypeError, match="pipe"):
        compare("digits", num_inference_steps=1)


@needs_fast_path
def test_bad_class_label_fails_before_sampling(tiny_pipeline):
    with pytest.raises(ValueError, match="class_labels"):
        compare(tiny_pipeline(DEVICE), num_inference_steps=1, class_labels=[7], repeats=0)


@pytest.mark.skipif(torch.cuda.is_available() or not backend.triton_available(),
                    reason="the case of a CPU, with triton installed but without the interpreter")
def test_cpu_without_the_interpreter_says_how_to_run(monkeypatch, tiny_pipeline):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compare(tiny_pipeline(DEVICE), num_inference_steps=1)


def test_cli_bad_flags(capsys):
    for flag, value in (("--tolerance", "-1"), ("--dtype", "float64")):
        with pytest.raises(SystemExit):
            cli(flag, value)
        assert flag in capsys.readouterr().err


def test_prepare_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert prepare_interpreter("cuda") is False  # kernels run natively there
    monkeypatch.setitem(sys.modules, "triton", sys.modules.get("triton", object()))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        prepare_interpreter("cpu")  # too late: triton is already imported
    monkeypatch.delitem(sys.modules, "triton")
    assert prepare_interpreter("cpu") is True and backend.interpreter_enabled()


def test_pipeline_callback_sees_every_step_and_changes_nothing(tiny_pipeline):
    pipe, seen = tiny_pipeline(DEVICE), []
    with fastdiff.use_backend("torch"):
        plain = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), progress=False)
        hooked = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), progress=False,
                      callback=lambda i, t, x_t, x0: seen.append((i, t, x_t.shape, x0.shape)))
    assert torch.equal(plain.images, hooked.images)
    shape = (1, 1, SIZE, SIZE)
    assert seen == [(i, t, shape, shape) for i, t in enumerate(pipe.scheduler.timesteps.tolist())]
    with pytest.raises(TypeError, match="callback"):
        pipe(num_inference_steps=1, callback="print")
