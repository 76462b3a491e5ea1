"""Scale-out on torch.distributed, tested on CPU with 2-rank gloo runs under torchrun.

Sampling: a 2-process run writes every image exactly once, byte-identical to a 1-process run with
the same seed (batches have a fixed composition, so both compute image i with the same arithmetic);
a rerun regenerates only the missing PNGs; a process SIGKILLed mid-write leaves no partial PNG and
the rerun completes the set. Training: 2 DDP ranks end bit-identical, rank 0's checkpoint holds
what every rank holds, and a run stopped at step 2 and resumed through the CLI ends bit-identical to
an uninterrupted one; a process SIGKILLed while saving leaves the previous checkpoint loadable and
the resumed run equals the straight one. torchrun costs ~4 s per launch, so there are three.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff import load_pretrained
from fastdiff.cli import main
from fastdiff.io import load_tensors
from fastdiff.sample_many import image_generator, sample_many
from fastdiff.training import CHECKPOINT_NAME, EpochShards, TrainConfig, read_checkpoint, train

NUM_IMAGES, BATCH, STEPS, SEED = 7, 3, 3, 5  # batches {0,1,2} {3,4,5} {6}: the ranks get unequal shares
TINY_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


def run_python(args, timeout=300):
    env = {**os.environ, "FASTDIFF_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def torchrun(*args):
    """A 2-process gloo job on a free port (--standalone), like ``torchrun --nproc-per-node 2 ...``."""
    result = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def sample_args(model, outdir, *extra):
    return ["sample", "--model", str(model), "--num-images", str(NUM_IMAGES), "--outdir", str(outdir),
            "--batch-size", str(BATCH), "--steps", str(STEPS), "--seed", str(SEED), "--eta", "1", "--device", "cpu",
            *extra]


@pytest.fixture(scope="module")
def reference_set(tiny_model, tmp_path_factory):
    """The set written by one process without torchrun: what every other run must reproduce."""
    outdir = tmp_path_factory.mktemp("reference")
    assert main([*sample_args(tiny_model, outdir, "--npz"), "--no-progress"]) == 0
    return outdir


def png_names(outdir):
    return sorted(p.name for p in outdir.iterdir() if p.suffix == ".png")


EXPECTED = [f"{i:06d}.png" for i in range(NUM_IMAGES)]


# ----------------------------------------------------------------------------- sampling
def test_two_ranks_write_every_image_once_identical_to_one_process(tiny_model, reference_set, tmp_path):
    outdir = tmp_path / "two"
    out = torchrun("-m", "fastdiff", *sample_args(tiny_model, outdir, "--npz", "--no-progress"))
    assert "wrote 7 images, 0 already there" in out and "2 processes" in out  # summed over ranks: none twice
    assert sorted(p.name for p in outdir.iterdir()) == [*EXPECTED, "samples.npz", "sampling.json"]
    for name in EXPECTED:
        assert (outdir / name).read_bytes() == (reference_set / name).read_bytes(), name
    ours, reference = np.load(outdir / "samples.npz"), np.load(reference_set / "samples.npz")
    assert ours["arr_0"].shape == (NUM_IMAGES, 8, 8, 1) and ours["arr_0"].dtype == np.uint8
    assert np.array_equal(ours["arr_0"], reference["arr_0"])
    assert ours["arr_1"].tolist() == [i % 3 for i in range(NUM_IMAGES)]
    assert len(np.unique(ours["arr_0"].reshape(NUM_IMAGES, -1), axis=0)) == NUM_IMAGES  # seeds really differ


def test_rerun_on_two_ranks_regenerates_only_missing_images(tiny_model, reference_set, tmp_path):
    outdir = tmp_path / "partial"
    shutil.copytree(reference_set, outdir)
    (outdir / "000001.png").unlink()  # batch 0 -> rank 0
    (outdir / "000004.png").unlink()  # batch 1 -> rank 1
    (outdir / ".000005.png.x1y2.tmp").write_bytes(b"\x89PNG half")  # a killed writer's leftover
    kept = {name: (outdir / name).stat().st_mtime_ns for name in png_names(outdir)}
    out = torchrun("-m", "fastdiff", *sample_args(tiny_model, outdir, "--no-progress"))
    assert "wrote 2 images, 5 already there" in out
    assert png_names(outdir) == EXPECTED and not list(outdir.glob(".*.tmp"))
    assert {name: (outdir / name).stat().st_mtime_ns for name in kept} == kept  # untouched
    for name in EXPECTED:
        assert (outdir / name).read_bytes() == (reference_set / name).read_bytes(), name


KILL_WHILE_WRITING = """
import os, signal, sys
import fastdiff.sample_many as sample_many
from fastdiff.cli import main

real_write, calls = sample_many.atomic_write, [0]

def dying_write(path, write):
    calls[0] += 1
    if calls[0] < 4:
        return real_write(path, write)
    def half_then_die(tmp):
        write(tmp)
        data = open(tmp, "rb").read()
        open(tmp, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(path, half_then_die)

sample_many.atomic_write = dying_write
sys.exit(main(sys.argv[1:]))
"""


def test_killed_while_writing_then_rerun_completes(tiny_model, reference_set, tmp_path, capsys):
    outdir = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_WHILE_WRITING)
    died = run_python([str(script), *sample_args(tiny_model, outdir, "--no-progress")])
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert png_names(outdir) == EXPECTED[:3] and len(list(outdir.glob(".000003.png.*.tmp"))) == 1

    assert main([*sample_args(tiny_model, outdir), "--no-progress"]) == 0
    assert "wrote 4 images, 3 already there" in capsys.readouterr().out
    assert sorted(p.name for p in outdir.iterdir()) == [*EXPECTED, "sampling.json"]  # temp file gone
    for name in EXPECTED:
        assert (outdir / name).read_bytes() == (reference_set / name).read_bytes(), name


def test_image_i_does_not_depend_on_its_batch(tiny_model):
    """Per-image generators make image i independent of its neighbours; kernels block by batch size,
    so the floats agree to ~1e-7, not bit for bit (same-composition batches are what makes PNGs equal)."""
    pipe = load_pretrained(tiny_model)

    def draw(indices):
        return pipe(batch_size=len(indices), num_inference_steps=STEPS, eta=1.0, progress=False,
                    generator=[image_generator(SEED, i) for i in indices], class_labels=[i % 3 for i in indices]).images

    together = draw(list(range(NUM_IMAGES)))
    torch.testing.assert_close(draw([5, 2]), together[[5, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(draw([6]), together[[6]], atol=1e-5, rtol=0)
    assert not torch.allclose(together[0], together[3], atol=1e-2)  # same class, other seed: another image


def test_rerun_with_other_settings_is_refused(tiny_model, reference_set, tmp_path, capsys):
    outdir = tmp_path / "other"
    shutil.copytree(reference_set, outdir)
    assert main([*sample_args(tiny_model, outdir, "--guidance", "3"), "--no-progress"]) == 2
    assert "guidance_scale" in capsys.readouterr().err
    (outdir / "sampling.json").unlink()
    with pytest.raises(ValueError, match="no sampling.json"):
        sample_many(load_pretrained(tiny_model), NUM_IMAGES, outdir, progress=False)


@pytest.mark.parametrize("extra, message", [(["--outdir", "x"], "--num-images"),
                                            (["--num-images", "0", "--outdir", "x"], "argument --num-images"),
                                            (["--num-images", "3", "--outdir", "x", "--batch-size", "0"],
                                             "argument --batch-size"),
                                            (["--num-images", "3", "--outdir", "x", "--scale", "4"], "--scale"),
                                            (["--num-images", "3", "--outdir", "x", "--class", "7"], "classes")])
def test_bad_sampling_arguments_are_messages(tiny_model, tmp_path, extra, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--model", str(tiny_model), "--steps", "2", "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- training
def test_epoch_shards_are_disjoint_and_stateless():
    config = TrainConfig(batch_size=4, seed=3)
    ranks = [EpochShards(21, config, rank, 2) for rank in range(2)]  # 10 per rank per epoch: 2 steps
    assert ranks[0].steps_per_epoch == 2
    epoch0 = [torch.cat([shards(0), shards(1)]) for shards in ranks]
    together = torch.cat(epoch0).tolist()
    assert len(set(together)) == 16 and max(together) < 21  # no image twice within an epoch
    assert not torch.equal(ranks[0](2), ranks[0](0))  # the next epoch is reshuffled
    assert torch.equal(EpochShards(21, config, 1, 2)(3), ranks[1](3))  # a fresh (resumed) run agrees
    with pytest.raises(ValueError, match="batch_size"):
        EpochShards(21, TrainConfig(batch_size=11), 0, 2)


DDP_TRAINING = """
import sys
from fastdiff import distributed
from fastdiff.cli import main
from fastdiff.io import save_tensors
from fastdiff.training import TrainConfig, train

root = sys.argv[1]
config = dict(batch_size=8, checkpoint_every=2, device="cpu")  # the CLI flags below, as a TrainConfig
straight = train(TrainConfig(out_dir=root + "/straight", steps=4, **config), progress=False)
state = {"model." + k: v for k, v in straight.model.state_dict().items()}
state.update({"ema." + k: v for k, v in straight.ema.state_dict().items()})
save_tensors(state, f"{root}/rank{distributed.rank()}.safetensors")  # what this rank holds
train(TrainConfig(out_dir=root + "/resumed", steps=2, **config), progress=False)
sys.exit(main(["train", "--out", root + "/resumed", "--resume", "--steps", "4", "--batch-size", "8",
               "--checkpoint-every", "2", "--device", "cpu", "--no-progress"]))
"""


def test_ddp_ranks_stay_in_sync_and_resume_is_exact(tmp_path):
    """2 ranks on the digits preset: 4 straight steps, and 2 + 2 with the second half a CLI --resume."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_TRAINING)
    out = torchrun(str(script), str(tmp_path))
    assert out.count("trained 4 steps") == 1  # rank 0 alone reports
    rank0, rank1 = (load_tensors(tmp_path / f"rank{r}.safetensors") for r in range(2))
    straight = load_tensors(tmp_path / "straight" / CHECKPOINT_NAME)
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name  # the replicas and their EMAs agree bit for bit
        assert torch.equal(value, straight[name]), name  # and rank 0's checkpoint is what they hold
    assert sorted(p.name for p in (tmp_path / "straight").iterdir()) == [CHECKPOINT_NAME, "pipeline"]

    resumed = load_tensors(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    _, meta_straight = read_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    _, meta_resumed = read_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert meta_straight["world_size"] == meta_resumed["world_size"] == "2"
    assert meta_straight["loss_history"] == meta_resumed["loss_history"] and meta_resumed["step"] == "4"

    with pytest.raises(ValueError, match="2 process"):  # one process cannot continue a 2-process run
        train(TrainConfig(out_dir=str(tmp_path / "straight"), steps=6, batch_size=8, device="cpu"),
              progress=False, resume=True)


KILL_WHILE_SAVING = """
import json, os, signal, sys
import fastdiff.io
from fastdiff.training import TrainConfig, train

def half_then_die(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\\x00" * 4096)
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

fastdiff.io.save_file = half_then_die
train(TrainConfig(**json.loads(sys.argv[1])), progress=False, resume=True)
"""


def tiny_training(tmp_path, name, **overrides) -> dict:
    settings = dict(out_dir=str(tmp_path / name), model_overrides=TINY_UNET, batch_size=16, steps=6,
                    checkpoint_every=3, device="cpu")
    return {**settings, **overrides}


def test_killed_while_saving_keeps_the_checkpoint_and_resume_continues_the_run(tmp_path):
    straight = train(TrainConfig(**tiny_training(tmp_path, "straight")), progress=False)
    train(TrainConfig(**tiny_training(tmp_path, "killed", steps=3)), progress=False)
    checkpoint = tmp_path / "killed" / CHECKPOINT_NAME
    before = checkpoint.read_bytes()

    script = tmp_path / "kill.py"
    script.write_text(KILL_WHILE_SAVING)
    died = run_python([str(script), json.dumps(tiny_training(tmp_path, "killed"))])
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert checkpoint.read_bytes() == before and read_checkpoint(checkpoint)[1]["step"] == "3"
    assert len(list(checkpoint.parent.glob(f".{CHECKPOINT_NAME}.*.tmp"))) == 1  # the half-written file

    resumed = train(TrainConfig(**tiny_training(tmp_path, "killed")), progress=False, resume=True)
    assert resumed.loss_history == straight.loss_history
    a, b = load_tensors(straight.checkpoint_path), load_tensors(checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert not list(checkpoint.parent.glob(".*.tmp"))  # the leftover is cleaned on resume
