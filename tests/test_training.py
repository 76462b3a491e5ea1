"""Training: the loss goes down, resuming is bit-exact, checkpoints survive crashes and refuse junk,
a run that cannot end well is refused before step 1, and a diverging run never writes NaN weights.

Every run uses a tiny U-Net (two levels of 16/32 channels, ~0.1M parameters) so a test takes
seconds on a CPU; dropout stays on (0.1, from the preset) so resuming must restore the global RNG.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_io import corrupt_data_section
from test_validation import read_only_dir

import fastdiff.io
import fastdiff.training as training
from fastdiff.data import digits_dataset, image_folder_dataset, load_dataset
from fastdiff.io import load_tensors, save_tensors
from fastdiff.training import (CHECKPOINT_NAME, PIPELINE_DIR, TrainConfig, TrainingDivergedError, add_arguments,
                               config_from_args, pipeline_files, read_checkpoint, run, saved_activation_bytes,
                               step_memory, train)

TINY_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


def tiny_config(tmp_path, name="run", **overrides) -> TrainConfig:
    settings = dict(out_dir=str(tmp_path / name), model_overrides=TINY_UNET, batch_size=32, steps=6,
                    checkpoint_every=3, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def checkpoint_tensors(config: TrainConfig) -> dict[str, torch.Tensor]:
    return load_tensors(f"{config.out_dir}/{CHECKPOINT_NAME}")


def parse_flags(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(flags))


def no_step(*args, **kwargs):
    """Stands in for ``train_step`` where a test wants the run refused before step 1."""
    raise AssertionError("a training step ran: the run should have been refused before step 1")


# ----------------------------------------------------------------------------- learning
def test_loss_decreases_on_digits(tmp_path):
    config = tiny_config(tmp_path, steps=40, lr=3e-3, warmup_steps=5, checkpoint_every=40, prediction_type="epsilon")
    result = train(config, progress=False)
    losses = result.loss_history
    assert len(losses) == 40 and all(np.isfinite(losses))
    first, last = losses[0], np.mean(losses[-10:])
    # Predicting ε = 0 scores exactly 1 (E[ε²]); the untrained net scores about that. Getting well
    # below it means the net has learned to see the noise in x_t, not just to shrink its output.
    assert first > 0.9
    # (On this seed it reaches ~0.16 in 40 steps.)
    assert last < 0.4, (first, last)


def test_saved_pipeline_holds_the_ema_weights(tmp_path):
    import fastdiff

    config = tiny_config(tmp_path, steps=3, beta_schedule="linear")  # v-prediction: the default
    result = train(config, progress=False)
    pipe = fastdiff.load_pretrained(result.pipeline_path)
    ema = {k[len("ema."):]: v for k, v in checkpoint_tensors(config).items() if k.startswith("ema.")}
    loaded = pipe.unet.state_dict()
    assert loaded.keys() == ema.keys()
    assert all(torch.equal(loaded[k].cpu(), ema[k]) for k in ema)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "linear"
    assert pipe.scheduler.config.clip_sample is False  # build_scheduler: clipping x̂0 drifts with the steps
    assert pipe.scheduler.config.timestep_spacing == "trailing"  # from t = T-1: fine for v, not for ε


def test_an_epsilon_model_keeps_leading_spacing():
    assert training.build_scheduler(TrainConfig(prediction_type="epsilon")).config.timestep_spacing == "leading"


# ----------------------------------------------------------------------------- resuming
def test_resume_is_bit_exact(tmp_path):
    straight = train(tiny_config(tmp_path, "straight"), progress=False)

    interrupted = tiny_config(tmp_path, "interrupted", steps=3)
    first_half = train(interrupted, progress=False)
    assert first_half.step == 3
    resumed = train(tiny_config(tmp_path, "interrupted"), progress=False, resume=True)

    assert resumed.step == straight.step == 6
    assert resumed.loss_history == straight.loss_history  # float equality: the same computation
    a = checkpoint_tensors(tiny_config(tmp_path, "straight"))
    b = checkpoint_tensors(tiny_config(tmp_path, "interrupted"))
    assert a.keys() == b.keys()
    assert {k.split(".")[0] for k in a} == {"model", "ema", "optimizer", "rng"}
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different


def test_resume_refuses_a_changed_config(tmp_path):
    train(tiny_config(tmp_path, steps=3), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_config(tmp_path, batch_size=16), progress=False, resume=True)
    with pytest.raises(ValueError, match="prediction_type"):
        train(tiny_config(tmp_path, prediction_type="epsilon"), progress=False, resume=True)
    with pytest.raises(ValueError, match="model_overrides"):
        train(tiny_config(tmp_path, model_overrides={**TINY_UNET, "layers_per_block": 2}), progress=False,
              resume=True)


def test_refuses_to_overwrite_or_resume_nothing(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train(tiny_config(tmp_path), progress=False, resume=True)
    train(tiny_config(tmp_path, steps=1), progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(tmp_path), progress=False)


# ----------------------------------------------------------------------------- checkpoint files
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, steps=3)
    train(config, progress=False)
    path = tmp_path / "run" / CHECKPOINT_NAME
    before = path.read_bytes()

    def crash_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a partial file, then the process "dies"
        raise OSError("simulated crash while writing the checkpoint")

    monkeypatch.setattr(fastdiff.io, "save_file", crash_halfway)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny_config(tmp_path), progress=False, resume=True)
    assert path.read_bytes() == before
    _, metadata = read_checkpoint(path)
    assert metadata["step"] == "3"
    assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT_NAME, "pipeline"]  # no temp files

    monkeypatch.undo()
    assert train(tiny_config(tmp_path), progress=False, resume=True).step == 6


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle", "not_a_checkpoint"])
def test_bad_checkpoint_is_refused_on_resume(tmp_path, damage):
    config = tiny_config(tmp_path, steps=1)
    train(config, progress=False)
    path = tmp_path / "run" / CHECKPOINT_NAME
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x12\x34" * 500)
    elif damage == "pickle":
        path.write_bytes(pickle.dumps({"model.conv_in.weight": [1.0, 2.0]}))
    else:  # a valid safetensors file that is not a training checkpoint
        save_tensors({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="checkpoint"):
        train(tiny_config(tmp_path), progress=False, resume=True)


def test_corrupt_checkpoint_data_is_refused_before_any_step(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, steps=3), progress=False)
    path = tmp_path / "run" / CHECKPOINT_NAME
    corrupt_data_section(path)  # header intact: safetensors alone would load it
    monkeypatch.setattr(training, "train_step", no_step)
    with pytest.raises(ValueError, match=rf"checkpoint: {re.escape(str(path))} is corrupt"):
        train(tiny_config(tmp_path), progress=False, resume=True)


def test_cli_resume_from_a_corrupt_checkpoint_exits_nonzero_without_training(tmp_path):
    flags = ["--out", str(tmp_path / "cli"), "--batch-size", "4", "--checkpoint-every", "1", "--device", "cpu",
             "--no-progress"]
    assert run(parse_flags("--steps", "1", *flags)) == 0
    path = tmp_path / "cli" / CHECKPOINT_NAME
    corrupt_data_section(path)
    corrupted = path.read_bytes()
    result = subprocess.run([sys.executable, "-m", "fastdiff", "train", "--resume", "--steps", "2", *flags],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                            env={**os.environ, "FASTDIFF_BACKEND": "torch", "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert str(path) in result.stderr and "corrupt" in result.stderr, result.stderr
    assert "trained" not in result.stdout
    assert path.read_bytes() == corrupted  # no step ran, nothing was saved over it


# ----------------------------------------------------------------------------- refused before step 1
@pytest.mark.parametrize("kind, obstacle, out", [
    ("file", "run", "run"),  # --out is a file
    ("file", "parent", "parent/run"),  # a folder above it is
    ("dir", f"run/{CHECKPOINT_NAME}", "run"),
    ("file", f"run/{PIPELINE_DIR}", "run"),
    ("file", f"run/{PIPELINE_DIR}/unet", "run"),
    ("dir", f"run/{PIPELINE_DIR}/unet/model.safetensors", "run"),
])
def test_an_out_that_cannot_be_written_is_refused_before_step_1(tmp_path, monkeypatch, kind, obstacle, out):
    obstacle = tmp_path / obstacle  # a file where a folder must go, or a folder where a file must go
    obstacle.parent.mkdir(parents=True, exist_ok=True)
    obstacle.mkdir() if kind == "dir" else obstacle.write_text("")
    monkeypatch.setattr(training, "train_step", no_step)
    # a folder where a file goes: "<obstacle> is a folder"; a file where a folder goes: "... <obstacle> is a file"
    with pytest.raises(ValueError, match=rf"--out: (cannot write .*: )?{re.escape(str(obstacle))} is a"):
        train(tiny_config(tmp_path, out_dir=str(tmp_path / out)), progress=False)


def test_an_out_in_a_read_only_directory_is_refused_before_step_1(tmp_path, monkeypatch):
    parent = read_only_dir(tmp_path)  # skips where chmod cannot stop this process (root)
    monkeypatch.setattr(training, "train_step", no_step)
    try:
        with pytest.raises(ValueError, match=rf"--out: cannot write .*{re.escape(str(parent))}"):
            train(tiny_config(tmp_path, out_dir=str(parent / "run")), progress=False)
    finally:
        parent.chmod(0o755)


def test_an_out_where_creating_files_fails_is_refused_before_step_1(tmp_path, monkeypatch):
    """The read-only case where chmod cannot produce it: the write probe itself fails."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fastdiff.io.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(training, "train_step", no_step)
    with pytest.raises(ValueError, match=r"--out: cannot write .*Permission denied"):
        train(tiny_config(tmp_path), progress=False)


def test_pipeline_files_are_what_save_pipeline_writes(tmp_path):
    """``check_outputs`` checks ``pipeline_files``: it must list exactly the files a pipeline save writes."""
    result = train(tiny_config(tmp_path, steps=1), progress=False)
    written = sorted(p for p in result.pipeline_path.rglob("*") if p.is_file())
    assert written == sorted(pipeline_files(result.pipeline_path))


def test_a_batch_larger_than_the_data_set_is_refused_before_step_1(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "train_step", no_step)
    args = parse_flags("--out", str(tmp_path / "run"), "--batch-size", "100000", "--device", "cpu", "--no-progress")
    with pytest.raises(ValueError, match=r"batch_size 100000 is more than the 1797 images in dataset 'digits'; "
                                         r"lower --batch-size to at most 1797"):
        run(args)
    assert not (tmp_path / "run").exists()


def test_a_batch_that_does_not_fit_in_memory_is_refused_before_step_1(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, steps=1)
    per_image, fixed = step_memory(training.build_model(config, 10), config)
    available = fixed + 20 * per_image  # room for a batch of 20: 32 does not fit
    monkeypatch.setattr(training, "available_memory", lambda device: (available, "a test's budget"))
    real_step = training.train_step
    monkeypatch.setattr(training, "train_step", no_step)
    with pytest.raises(ValueError, match=rf"batch_size 32: a training step needs at least .* GiB on cpu .* but only "
                                         rf"{available / 2**30:.3g} GiB is available \(a test's budget\); lower "
                                         r"--batch-size to 20 or less"):
        train(config, progress=False)
    monkeypatch.setattr(training, "train_step", real_step)
    assert train(tiny_config(tmp_path, steps=1, batch_size=20), progress=False).step == 1
    monkeypatch.setattr(training, "available_memory", lambda device: (fixed + per_image - 1, "a test's budget"))
    with pytest.raises(ValueError, match="not even a batch of 1 fits"):
        train(tiny_config(tmp_path, "other", steps=1), progress=False)


def cgroup_tree(root: Path, proc: str, levels: dict[str, dict[str, str]]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup under ``root`` (``levels``: folder → its files) and /proc/self/cgroup."""
    for folder, files in levels.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / folder / name).write_text(text)
    (root / "proc-self-cgroup").write_text(proc)
    return root / "sys", root / "proc-self-cgroup"


def v1(limit, usage, inactive):
    return {"memory.limit_in_bytes": f"{limit}\n", "memory.usage_in_bytes": f"{usage}\n",
            "memory.stat": f"cache 5\ninactive_file 1\ntotal_inactive_file {inactive}\n"}


def v2(limit, usage, inactive):
    return {"memory.max": f"{limit}\n", "memory.current": f"{usage}\n",
            "memory.stat": f"anon 5\ninactive_file {inactive}\nactive_file 7\n"}


V1_PROC = "4:memory:/pod/app\n3:cpu,cpuacct:/\n0::/\n"


@pytest.mark.parametrize("proc, levels, expected", [
    # v1: the tightest of the cgroup and its ancestors (here the pod's), reclaimable cache counted free
    (V1_PROC, {"sys/memory": v1(2**63 - 4096, 9000, 0), "sys/memory/pod": v1(5000, 3000, 500),
               "sys/memory/pod/app": v1(8000, 3000, 1000)}, 2500),
    (V1_PROC, {"sys/memory": v1(9223372036854771712, 9000, 0), "sys/memory/pod/app": v1(9223372036854771712, 1, 0)},
     None),  # no limit anywhere (v1 writes "none" as a number near 2**63)
    # a container's namespace: /proc lists its cgroup's path, the mount shows that cgroup as its root
    (V1_PROC, {"sys/memory": v1(4000, 1000, 0)}, 3000),
    ("0::/user.slice/job\n", {"sys": v2("max", 1, 0), "sys/user.slice": v2("max", 1, 0),
                                "sys/user.slice/job": v2(1000, 600, 100)}, 500),
    ("0::/job\n", {"sys": v2("max", 1, 0), "sys/job": v2("max", 600, 100)}, None),
    ("0::/\n", {"sys": v2(10, 30, 0)}, 0),  # over its limit: nothing left
    ("garbage\n", {}, None),
])
def test_cgroup_headroom_reads_v1_and_v2_limits(tmp_path, proc, levels, expected):
    root, proc_cgroup = cgroup_tree(tmp_path, proc, levels)
    assert training.cgroup_headroom(root, proc_cgroup) == expected


def test_available_memory_on_the_cpu_is_the_container_limit_when_tighter(monkeypatch):
    machine = training.available_memory(torch.device("cpu"))
    monkeypatch.setattr(training, "cgroup_headroom", lambda: 12345)
    assert training.available_memory(torch.device("cpu")) == (12345, "the memory cgroup's limit less its usage: "
                                                                     "a container's limit")
    if machine is not None:  # a machine without /proc/meminfo has no number to compare
        monkeypatch.setattr(training, "cgroup_headroom", lambda: machine[0] + 1)
        assert training.available_memory(torch.device("cpu")) == machine


def test_the_activation_estimate_scales_with_the_batch_and_keeps_the_rng(tmp_path):
    """``step_memory`` measures at batch 1 and multiplies: check that the saved bytes are linear in B."""
    config = tiny_config(tmp_path)
    model = training.build_model(config, 10)
    state = torch.get_rng_state()
    one, eight = saved_activation_bytes(model, config, 1), saved_activation_bytes(model, config, 8)
    assert torch.equal(torch.get_rng_state(), state)  # dropout ran under fork_rng: resume stays exact
    assert one > 0 and 0.9 * 8 * one <= eight <= 1.1 * 8 * one, (one, eight)


# ----------------------------------------------------------------------------- divergence
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step, real_save = training.train_step, training.save_checkpoint
    written = {}

    def nan_at_step_5(model, optimizer, batch, alphas_cumprod, config, step):
        loss = real_step(model, optimizer, batch, alphas_cumprod, config, step)
        return math.nan if step + 1 == 5 else loss  # step is 0-based: this is the 5th step

    def recording_save(path, config, step, *args, **kwargs):
        real_save(path, config, step, *args, **kwargs)
        written[step] = path.read_bytes()

    monkeypatch.setattr(training, "train_step", nan_at_step_5)
    monkeypatch.setattr(training, "save_checkpoint", recording_save)
    path = tmp_path / "run" / CHECKPOINT_NAME
    with pytest.raises(TrainingDivergedError, match=rf"step 5: the loss is nan; .*{re.escape(str(path))} still "
                                                    r"holds step 3"):
        train(tiny_config(tmp_path), progress=False)  # 6 steps, checkpoints at 3 and 6
    assert issubclass(TrainingDivergedError, RuntimeError)  # the CLI turns it into a message and exit 2
    assert list(written) == [3] and path.read_bytes() == written[3]
    assert not (tmp_path / "run" / PIPELINE_DIR).exists()

    monkeypatch.undo()
    assert train(tiny_config(tmp_path), progress=False, resume=True).step == 6


def test_nonfinite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    real_step = training.train_step

    def inf_weight_after_step_6(model, optimizer, batch, alphas_cumprod, config, step):
        loss = real_step(model, optimizer, batch, alphas_cumprod, config, step)  # finite: computed before the update
        if step + 1 == 6:
            with torch.no_grad():
                model.conv_out.weight[0, 0, 0, 0] = math.inf
        return loss

    monkeypatch.setattr(training, "train_step", inf_weight_after_step_6)
    with pytest.raises(TrainingDivergedError, match=r"step 6: NaN or inf in model.conv_out.weight, "
                                                    r"ema.conv_out.weight; .*refusing to write the step-6 checkpoint"):
        train(tiny_config(tmp_path), progress=False)
    _, metadata = read_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert metadata["step"] == "3"
    assert not (tmp_path / "run" / PIPELINE_DIR).exists()


def test_a_nan_pipeline_is_never_written(tmp_path):
    """A checkpoint with NaN EMA weights (from before these checks) resumed at its last step: no pipeline."""
    train(tiny_config(tmp_path, steps=3), progress=False)
    pipeline = tmp_path / "run" / PIPELINE_DIR
    shutil.rmtree(pipeline)
    path = tmp_path / "run" / CHECKPOINT_NAME
    tensors, metadata = training.read_checkpoint(path)
    tensors["ema.conv_out.bias"][0] = math.nan
    save_tensors(tensors, path, metadata=metadata)  # a valid checksum over the NaN
    with pytest.raises(TrainingDivergedError, match=r"step 3: NaN or inf in ema.conv_out.bias; .*refusing to write "
                                                    r"the pipeline"):
        train(tiny_config(tmp_path, steps=3), progress=False, resume=True)
    assert not pipeline.exists()


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value", [
    ("prediction_type", "foo"), ("beta_schedule", "cubic"), ("steps", 0), ("batch_size", 0),
    ("label_dropout", 1.5), ("label_dropout", -0.1), ("ema_decay", 1.0), ("lr", 0.0), ("grad_clip", 0.0),
    ("channels", 2), ("checkpoint_every", 0), ("warmup_steps", -1),
    ("lr", math.inf), ("lr", math.nan), ("lr", "1e-3"), ("weight_decay", math.inf), ("weight_decay", math.nan),
    ("grad_clip", math.inf), ("grad_clip", math.nan), ("ema_decay", math.nan), ("label_dropout", math.nan),
    ("seed", 2**64), ("seed", -1), ("seed", 1.0),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=field):  # TypeError for a string or a float seed
        TrainConfig(**{field: value})


def test_seed_range_is_torch_generators():
    for seed in (0, 2**64 - 1):
        torch.Generator().manual_seed(TrainConfig(seed=seed).seed)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        run(parse_flags("--lr", "inf", "--device", "cpu"))


def test_cli_flags_build_the_config(tmp_path, capsys):
    args = parse_flags("--out", str(tmp_path / "cli"), "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1",
                       "--device", "cpu", "--no-progress")
    assert run(args) == 0
    assert "pipeline saved to" in capsys.readouterr().out
    _, metadata = read_checkpoint(tmp_path / "cli" / CHECKPOINT_NAME)
    assert metadata["step"] == "2"


def test_cli_resume_takes_the_checkpoints_settings(tmp_path):
    """`--resume` needs only --out: every other setting, the flagless model_overrides included, comes from
    the checkpoint; a flag given changes its field (resumable ones) or is refused (the others)."""
    out = str(tmp_path / "cli")
    train(tiny_config(tmp_path, "cli", steps=2, lr=3e-3, ema_decay=0.9, checkpoint_every=1), progress=False)
    resumed = config_from_args(parse_flags("--out", out, "--resume"))
    expected = tiny_config(tmp_path, "cli", steps=2, lr=3e-3, ema_decay=0.9, checkpoint_every=1)
    assert resumed.to_dict() == expected.to_dict()  # JSON form: the checkpoint keeps tuples as lists
    assert config_from_args(parse_flags("--out", out, "--resume", "--steps", "3")).steps == 3
    assert run(parse_flags("--out", out, "--resume", "--steps", "3", "--no-progress")) == 0
    assert read_checkpoint(Path(out) / CHECKPOINT_NAME)[1]["step"] == "3"
    with pytest.raises(ValueError, match="lr: 0.003 in the checkpoint vs 0.001 now"):
        run(parse_flags("--out", out, "--resume", "--steps", "4", "--lr", "1e-3", "--no-progress"))
    # Without --resume the flags left out are TrainConfig's defaults, whatever the folder holds.
    assert config_from_args(parse_flags("--out", out)) == TrainConfig(out_dir=out)


# ----------------------------------------------------------------------------- data
def test_digits_dataset():
    images, labels = digits_dataset(16)
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert labels.dtype == torch.int64 and sorted(labels.unique().tolist()) == list(range(10))
    with pytest.raises(ValueError, match="channels"):
        load_dataset("digits", 16, 3)


def _write_png(path, size, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_without_classes(tmp_path):
    _write_png(tmp_path / "white.png", (20, 12), (255, 255, 255))  # wide: resized then centre-cropped
    _write_png(tmp_path / "black.png", (9, 30), (0, 0, 0))
    images, labels = image_folder_dataset(tmp_path, image_size=8, channels=3)
    assert images.shape == (2, 3, 8, 8) and labels is None
    assert torch.all(images[0] == -1) and torch.all(images[1] == 1)  # sorted by name: black, white
    gray, _ = image_folder_dataset(tmp_path, image_size=8, channels=1)
    assert gray.shape == (2, 1, 8, 8)


def test_image_folder_with_classes_trains(tmp_path):
    data = tmp_path / "data"
    for name, color in [("zebra", (200, 200, 200)), ("ant", (10, 10, 10))]:
        for i in range(2):
            _write_png(data / name / f"{i}.png", (16, 16), color)
    images, labels = image_folder_dataset(data, image_size=16, channels=3)
    assert labels.tolist() == [0, 0, 1, 1]  # class ids follow sorted folder names: ant, zebra
    result = train(tiny_config(tmp_path, dataset=str(data), steps=2, batch_size=4), progress=False)
    assert len(result.loss_history) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        image_folder_dataset(tmp_path / "missing", image_size=16)
    with pytest.raises(ValueError, match="no images"):
        image_folder_dataset(tmp_path, image_size=16)
    _write_png(tmp_path / "cls" / "a.png", (16, 16), (0, 0, 0))
    _write_png(tmp_path / "loose.png", (16, 16), (0, 0, 0))
    with pytest.raises(ValueError, match="mixes"):
        image_folder_dataset(tmp_path, image_size=16)
