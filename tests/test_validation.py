"""Bad input is refused up front, naming the argument; a diverged model never becomes a black PNG.

One table per entry point (the CLI, the pipeline, the schedulers, the ops, the U-Net,
``load_pretrained``), each case the input a new user tried and the words the error must contain.
The CLI cases run ``fastdiff.cli.main`` in-process and check the whole of stderr is one line.
"""

import math
import os
import warnings
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff import DDIMScheduler, DDPMScheduler, ops, validation
from fastdiff.cli import main

NAN, INF = math.nan, math.inf
NO_CUDA = not torch.cuda.is_available()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- the CLI
SAMPLE = ["sample", "--steps", "2", "--no-progress"]
CLI_CASES = [
    # devices: one parser for every subcommand
    *[([command, "--device", "cuda"], "available here: cpu") for command in ("sample", "train", "quality", "compare")],
    (["sample", "--device", "foo"], "--device must be a device such as"),
    (["train", "--device", "gpu"], "device must be a device such as"),
    (["sample", "--device", "cuda:7"], "available here"),
    # numbers that cannot be right, or that meant "default" by accident
    (["sample", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["sample", "--scale", "0"], "argument --scale: must be an integer >= 1, got 0"),
    (["sample", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["sample", "--eta", "nan"], "argument --eta: must be a finite number >= 0"),
    (["sample", "--eta", "-1"], "argument --eta: must be a finite number >= 0"),
    (["sample", "--guidance", "inf"], "argument --guidance: must be a finite number"),
    (["sample", "--seed", str(2**64)], "argument --seed: must be an integer in [0, 18446744073709551615]"),
    (["sample", "--seed", "-1"], "argument --seed"),
    (["sample", "--seed", "x"], "argument --seed: must be an integer, got 'x'"),
    (["sample", "--batch", "3"], "unrecognized arguments: --batch"),  # one spelling: --batch-size
    (["quality", "--per-class", "0"], "argument --per-class: must be an integer >= 1"),
    (["quality", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["quality", "--runs", "ddim-0"], "run must look like SCHEDULER-STEPS"),
    (["compare", "--batch-size", "0"], "argument --batch-size"),
    (["compare", "--tolerance", "nan"], "argument --tolerance: must be a finite number >= 0"),
    # options that only make sense together
    (["sample", "--npz"], "--npz writes DIR/samples.npz of an evaluation set: it needs --outdir"),
    (["sample", "--num-images", "3"], "--num-images and --outdir go together"),
    # outputs checked before sampling
    (["sample", "--out", "x.jpgx"], "--out: x.jpgx must end in"),
]


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_refuses_in_one_line(args, message, capsys, tmp_path, monkeypatch):
    if "cuda" in args and not NO_CUDA:
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)  # a run that wrongly goes ahead writes here
    assert main(args) == 2
    assert message in one_line_error(capsys)


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling must not start: the CLI checks its outputs first."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampled before checking the output")

    monkeypatch.setattr(fastdiff.DiffusionPipeline, "__call__", refuse)


def test_sample_out_that_is_a_folder_is_refused_before_sampling(tmp_path, no_sampling, capsys):
    assert main([*SAMPLE, "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys)


def test_sample_out_under_a_file_is_refused_before_sampling(tmp_path, no_sampling, capsys):
    (tmp_path / "file").write_text("x")
    assert main([*SAMPLE, "--out", str(tmp_path / "file" / "grid.png")]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)


def test_sample_outdir_that_is_a_file_is_refused_before_sampling(tmp_path, no_sampling, capsys):
    (tmp_path / "set").write_text("x")
    assert main([*SAMPLE, "--outdir", str(tmp_path / "set"), "--num-images", "2"]) == 2
    assert "--outdir: cannot write" in one_line_error(capsys)


@pytest.mark.parametrize("flag, name", [("--json", "x.txt"), ("--grid", "x.jpgx")])
def test_quality_outputs_are_checked_before_sampling(flag, name, tmp_path, no_sampling, capsys):
    assert main(["quality", "--runs", "ddim-2", "--per-class", "1", flag, str(tmp_path / name)]) == 2
    assert f"{flag}: " in one_line_error(capsys)


def test_compare_png_that_is_a_folder_is_refused(tmp_path, capsys):
    assert main(["compare", "--steps", "2", "--png", str(tmp_path)]) == 2
    assert f"--png: {tmp_path} is a folder" in one_line_error(capsys)


def test_sample_batch_size_sets_the_grid(tiny_model, tmp_path, capsys):
    assert main([*SAMPLE, "--model", str(tiny_model), "--batch-size", "5", "--out", str(tmp_path / "g.png")]) == 0
    assert "wrote 5 samples" in capsys.readouterr().out


def test_a_training_folder_points_to_its_pipeline(tiny_model, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "run" / "pipeline")
    assert main([*SAMPLE, "--model", str(tmp_path / "run")]) == 2
    assert f"its pipeline is {tmp_path / 'run' / 'pipeline'}" in one_line_error(capsys)


# ----------------------------------------------------------------------------- the pipeline
PIPELINE_CASES = [
    ({"eta": NAN}, ValueError, "eta must be a finite number >= 0"),
    ({"eta": INF}, ValueError, "eta must be a finite number >= 0"),
    ({"eta": "a"}, TypeError, "eta must be a real number, got str 'a'"),
    ({"guidance_scale": NAN}, ValueError, "guidance_scale must be a finite number"),
    ({"guidance_scale": -INF}, ValueError, "guidance_scale must be a finite number"),
    ({"guidance_scale": "2"}, TypeError, "guidance_scale must be a real number"),
    ({"strength": 0.5}, ValueError, "strength applies to image-guided sampling only"),
    ({"strength": NAN, "image": "ok"}, ValueError, "strength must be a finite number in (0, 1]"),
    ({"strength": INF, "image": "ok"}, ValueError, "strength must be a finite number in (0, 1]"),
    ({"strength": "0.5", "image": "ok"}, TypeError, "strength must be a real number, got str '0.5'"),
    ({"image": "nan"}, ValueError, "image holds 1 NaN or infinite value"),
    ({"image": "inf"}, ValueError, "image holds 1 NaN or infinite value"),
    ({"image": "0-255"}, ValueError, "image must lie in [0, 1] (images are floats in [0, 1], not 0-255)"),
    ({"image": "shape"}, ValueError, "image must have shape (1, 8, 8) or (N, 1, 8, 8) with N = 1 or 2 (batch_size)"),
    ({"generator": 0}, TypeError, "generator must be a torch.Generator"),
    ({"generator": [0, 1]}, TypeError, "generator must be a torch.Generator"),
    ({"class_labels": "3"}, TypeError, "class_labels must be an int, a list of ints or an integer tensor"),
    ({"class_labels": ["3", "1"]}, TypeError, "class_labels must be an int, a list of ints"),
    ({"class_labels": 3}, ValueError, "class_labels must lie in [0, 2] (the model's 3 classes)"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be an integer in [1, 50]"),
    ({"progress": "no"}, TypeError, "progress must be True or False"),
    ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite must be one of 'raise', 'warn'"),
    ({"use_clipped_model_output": 1}, TypeError, "use_clipped_model_output must be True or False"),
]
def image_with(value: float) -> torch.Tensor:
    image = torch.full((1, 8, 8), 0.5)
    image[0, 3, 4] = value
    return image


IMAGES = {"ok": image_with(0.5), "nan": image_with(NAN), "inf": image_with(INF), "0-255": torch.full((1, 8, 8), 128.0),
          "shape": torch.full((3, 8, 8), 0.5)}


@pytest.mark.parametrize("kwargs, error, message", PIPELINE_CASES, ids=[str(k) for k, _, _ in PIPELINE_CASES])
def test_pipeline_refuses_before_sampling(tiny_pipeline, kwargs, error, message, monkeypatch):
    pipe = tiny_pipeline()
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the U-Net ran before the check"))
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("image"), str):
        kwargs["image"] = IMAGES[kwargs["image"]]
    kwargs = {"batch_size": 2, "num_inference_steps": 3, "class_labels": 1, "progress": False, **kwargs}
    with pytest.raises(error) as info:
        pipe(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("value", [NAN, INF, "2"])
def test_pipeline_default_guidance_must_be_finite(tiny_pipeline, value):
    pipe = tiny_pipeline()
    with pytest.raises((ValueError, TypeError), match="guidance_scale"):
        fastdiff.DiffusionPipeline(pipe.unet, pipe.scheduler, guidance_scale=value)
    pipe.guidance_scale = value  # set after construction: refused at the call
    with pytest.raises((ValueError, TypeError), match="pipeline.guidance_scale"):
        pipe(batch_size=1, num_inference_steps=2, class_labels=0, progress=False)


# ----------------------------------------------------------------------------- non-finite results
def diverged(tiny_pipeline):
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(INF)  # every prediction infinite, every image NaN
    return pipe


def test_nonfinite_images_raise(tiny_pipeline):
    with pytest.raises(validation.NonFiniteError, match="the sampled images: 128 of 128 values are NaN or infinite"):
        diverged(tiny_pipeline)(batch_size=2, num_inference_steps=3, progress=False)


def test_nonfinite_images_only_warn_when_asked(tiny_pipeline):
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        out = diverged(tiny_pipeline)(batch_size=2, num_inference_steps=3, progress=False, on_nonfinite="warn")
    assert out.images.shape == (2, 1, 8, 8)


def test_finite_images_do_not_warn(tiny_pipeline):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_pipeline()(batch_size=2, num_inference_steps=3, progress=False, on_nonfinite="warn")


def test_cli_writes_no_png_of_a_diverged_model(tiny_pipeline, tmp_path, capsys):
    diverged(tiny_pipeline).save_pretrained(tmp_path / "model")
    out = tmp_path / "grid.png"
    assert main([*SAMPLE, "--model", str(tmp_path / "model"), "--out", str(out)]) == 2
    assert "NaN or infinite" in one_line_error(capsys) and not out.exists()
    args = [*SAMPLE, "--model", str(tmp_path / "model"), "--outdir", str(tmp_path / "set"), "--num-images", "2"]
    assert main(args) == 2
    assert "NaN or infinite" in one_line_error(capsys) and not list((tmp_path / "set").glob("*.png"))


# ----------------------------------------------------------------------------- schedulers
SCHEDULER_CASES = [
    ({"beta_start": -1.0}, "beta_start must be a finite number in (0, 1)"),
    ({"beta_start": 0.0}, "beta_start must be a finite number in (0, 1)"),
    ({"beta_end": 1.0}, "beta_end must be a finite number in (0, 1)"),
    ({"beta_end": 2.0, "beta_schedule": "scaled_linear"}, "beta_end must be a finite number in (0, 1)"),
    ({"beta_start": NAN}, "beta_start must be a finite number"),
    ({"beta_end": NAN, "beta_schedule": "sigmoid"}, "beta_end must be a finite number"),
    ({"beta_start": 0.03, "beta_end": 0.02}, "beta_start must be <= beta_end"),
    ({"trained_betas": [0.1] * 9 + [NAN], "num_train_timesteps": 10}, "trained_betas must lie in (0, 1)"),
    ({"trained_betas": [0.1] * 9 + [1.0], "num_train_timesteps": 10}, "trained_betas must lie in (0, 1)"),
    ({"trained_betas": [0.0] * 10, "num_train_timesteps": 10}, "trained_betas must lie in (0, 1)"),
    ({"trained_betas": [0.1] * 9, "num_train_timesteps": 10}, "trained_betas must hold num_train_timesteps = 10"),
    ({"clip_sample_range": 0.0}, "clip_sample_range must be a finite number > 0"),
    ({"clip_sample": "false"}, "clip_sample must be True or False"),
    ({"sample_max_value": NAN}, "sample_max_value must be a finite number > 0"),
    ({"dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio must be a finite number in (0, 1]"),
    ({"num_train_timesteps": 0}, "num_train_timesteps must be an integer >= 1"),
    ({"beta_schedule": "cosine"}, "beta_schedule must be one of"),
]


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("config, message", SCHEDULER_CASES, ids=[str(c) for c, _ in SCHEDULER_CASES])
def test_scheduler_config_is_refused(cls, config, message):
    with pytest.raises((ValueError, TypeError)) as info:
        cls(**config)
    assert message in str(info.value)


def test_unused_betas_are_not_judged():
    """The cosine schedule ignores beta_start/beta_end (as diffusers does): configs carry them anyway."""
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", beta_start=0.0, beta_end=1.0)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("t", [-1, 1000, 5000, [3, -1], [999, 1000]])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_noise_refuses_timesteps_outside_the_schedule(cls, t, backend):
    x = torch.zeros(2 if isinstance(t, list) else 1, 1, 4, 4)
    with fastdiff.use_backend(backend), pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        cls().add_noise(x, torch.randn_like(x), torch.tensor(t))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        cls().get_velocity(x, torch.randn_like(x), torch.tensor(t))


def test_q_sample_refuses_cpu_timesteps_outside_the_table():
    x, table = torch.zeros(1, 1, 4, 4), DDIMScheduler().alphas_cumprod
    for t in (-1, 1000):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
            ops.q_sample(x, x, torch.tensor([t]), table)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_step_refuses_guidance_without_the_unconditional_output(cls):
    scheduler = cls()
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="guidance_scale=3 needs uncond_model_output"):
        scheduler.step(x, int(scheduler.timesteps[0]), x, guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        scheduler.step(x, int(scheduler.timesteps[0]), x, uncond_model_output=x, guidance_scale=NAN)
    scheduler.step(x, int(scheduler.timesteps[0]), x, guidance_scale=1.0)  # no guidance: nothing to combine


@pytest.mark.parametrize("t", [-1, 1000, 1.5, "3"])
def test_step_refuses_a_timestep_outside_the_schedule(t):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises((ValueError, TypeError), match="timestep"):
        scheduler.step(x, t, x)


# ----------------------------------------------------------------------------- ops
def step_inputs():
    x = torch.zeros(1, 1, 4, 4)
    return x, x, torch.tensor(0.5), torch.tensor(0.6)


OP_CASES = [
    (lambda: ops.ddim_step(*step_inputs(), clip_sample_range=0.0), "clip_sample_range must be a finite number > 0"),
    (lambda: ops.ddpm_step(*step_inputs(), clip_sample_range=-1.0), "clip_sample_range must be a finite number > 0"),
    (lambda: ops.ddim_step(*step_inputs()[:2], torch.tensor(1.5), torch.tensor(0.6)), "alpha_prod_t must lie in [0, 1]"),
    (lambda: ops.ddim_step(*step_inputs()[:3], torch.tensor(NAN)), "alpha_prod_t_prev holds 1 NaN"),
    (lambda: ops.ddpm_step(*step_inputs()[:2], torch.tensor(-0.1), torch.tensor(0.6)), "alpha_prod_t must lie in [0, 1]"),
    (lambda: ops.ddim_step(*step_inputs(), eta=NAN), "eta must be a finite number >= 0"),
    (lambda: ops.ddim_step(*step_inputs(), guidance_scale=2.0), "guidance_scale=2 needs uncond_model_output"),
    (lambda: ops.ddim_step(*step_inputs(), dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio must be"),
    (lambda: ops.group_norm(torch.zeros(1, 4, 2, 2), 2, eps=0.0), "eps must be a finite number > 0"),
    (lambda: ops.group_norm(torch.zeros(1, 4, 2, 2), 2, eps=NAN), "eps must be a finite number > 0"),
    (lambda: ops.attention(*[torch.zeros(1, 1, 4, 8)] * 3, scale=NAN), "scale must be a finite number"),
    (lambda: ops.attention(*[torch.zeros(1, 1, 4, 8)] * 3, scale="a"), "scale must be a real number"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", range(len(OP_CASES)), ids=[m for _, m in OP_CASES])
def test_ops_refuse_values_that_cannot_be_right(backend, case):
    call, message = OP_CASES[case]
    with fastdiff.use_backend(backend), pytest.raises((ValueError, TypeError)) as info:
        call()
    assert message in str(info.value)


# ----------------------------------------------------------------------------- the U-Net
@pytest.mark.parametrize("t, message", [(NAN, "timestep holds 1 NaN"), (-1, "timestep must lie in [0, 16777215]"),
                                        (1e30, "timestep must lie in [0, 16777215]"),
                                        (torch.tensor([3.0, INF]), "timestep holds 1 NaN"),
                                        ("3", "timestep must be a real number or a tensor")])
def test_unet_refuses_timesteps_no_model_was_trained_on(tiny_pipeline, t, message):
    unet = tiny_pipeline().unet
    with pytest.raises((ValueError, TypeError)) as info:
        unet(torch.zeros(2, 1, 8, 8), t)
    assert message in str(info.value)


def test_unet_refuses_another_dtype_naming_both(tiny_pipeline):
    unet = tiny_pipeline().unet
    with pytest.raises(TypeError, match="sample is torch.float64 but the U-Net's weights are torch.float32"):
        unet(torch.zeros(1, 1, 8, 8, dtype=torch.float64), 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the layers: allowed
        unet(torch.zeros(1, 1, 8, 8, dtype=torch.bfloat16), 10)


# ----------------------------------------------------------------------------- load_pretrained
@pytest.mark.parametrize("kwargs, error, message", [
    ({"path": None}, TypeError, "path must be a folder (str or os.PathLike) or an embedded model name"),
    ({"dtype": torch.complex64}, ValueError, "dtype must be torch.float32, torch.float16, torch.bfloat16 or"),
    ({"dtype": torch.int8}, ValueError, "dtype must be torch.float32"),
    ({"dtype": "float8"}, ValueError, "dtype must be torch.float32"),
    ({"dtype": 16}, TypeError, "dtype must be torch.float32"),
    ({"device": "gpu"}, ValueError, "device must be a device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"),
    ({"device": 5}, ValueError, "available here"),
    ({"device": 2.0}, TypeError, "device must be a device such as"),
    *([({"device": "cuda"}, ValueError, "device 'cuda' is not available")] if NO_CUDA else []),
])
def test_load_pretrained_refuses(kwargs, error, message):
    kwargs = {"path": "digits", **kwargs}
    with pytest.raises(error) as info:
        fastdiff.load_pretrained(kwargs.pop("path"), **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("name, dtype", [("float16", torch.float16), ("fp16", torch.float16),
                                         ("torch.bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                         ("float32", torch.float32), ("double", torch.float64)])
def test_load_pretrained_takes_the_dtype_names_people_type(name, dtype):
    assert fastdiff.load_pretrained("digits", dtype=name).dtype == dtype


# ----------------------------------------------------------------------------- the checks themselves
def test_real_and_integer_bounds_and_types():
    assert validation.real("x", 0.5, 0, 1, min_open=True) == 0.5
    assert validation.real("x", torch.tensor(2.0)) == 2.0
    assert validation.integer("n", torch.tensor(3), 1) == 3
    with pytest.raises(TypeError, match="x must be a real number, got bool True"):
        validation.real("x", True)
    with pytest.raises(TypeError, match="n must be an integer, got float 1.0"):
        validation.integer("n", 1.0)
    with pytest.raises(ValueError, match=r"x must be a finite number in \(0, 1\], got 0.0"):
        validation.real("x", 0.0, 0, 1, min_open=True)


def test_one_of_does_not_take_true_for_one():
    validation.one_of("c", 3, (1, 3))
    with pytest.raises(ValueError, match="c must be one of 1, 3; got True"):
        validation.one_of("c", True, (1, 3))


def test_device_parser_lists_what_is_here():
    assert validation.device("device", " CPU ") == torch.device("cpu")
    assert "cpu" in validation.available_devices()
    with pytest.raises(ValueError, match="available here: cpu"):
        validation.device("device", "tpu")


# ----------------------------------------------------------------------------- output locations
def test_output_file_accepts_new_and_existing_locations_and_leaves_nothing(tmp_path):
    validation.output_file("--out", tmp_path / "new" / "deeper" / "file.json")
    (tmp_path / "old.json").write_text("{}")
    validation.output_file("--out", tmp_path / "old.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # no folders made, no probe left


def test_output_file_refuses_a_directory_or_a_file_in_the_way(tmp_path):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match=r"--out: .*dir\.json is a folder; expected a file there"):
        validation.output_file("--out", tmp_path / "dir.json")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--out: cannot write .*x\.json: .*file is a file, not a folder"):
        validation.output_file("--out", tmp_path / "file" / "sub" / "x.json")


def read_only_dir(tmp_path) -> Path:
    """A directory this process cannot create files in; skips where chmod does not stop it (root)."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    try:
        (path / "probe").write_text("")
    except OSError:
        return path
    (path / "probe").unlink()
    path.chmod(0o755)
    pytest.skip(f"chmod 555 does not stop this process (uid {os.geteuid()}) from writing")


def test_output_file_refuses_a_read_only_directory(tmp_path):
    path = read_only_dir(tmp_path)
    try:
        with pytest.raises(ValueError, match="cannot write .* fails"):
            validation.output_file("--out", path / "run" / "checkpoint.safetensors")
    finally:
        path.chmod(0o755)


def test_output_file_refuses_when_creating_a_file_fails(tmp_path, monkeypatch):
    """The same refusal where chmod cannot produce it (root): the probe's OSError becomes a ValueError."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(validation.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=rf"--out: cannot write .*creating a file in {tmp_path} fails "
                                         r"\(Permission denied\)"):
        validation.output_file("--out", tmp_path / "run" / "x.json")
