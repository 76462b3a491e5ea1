"""The digits quality check: is the measurement sound, and does the embedded model pass it?

The measurement tests use real digits as stand-ins for samples: real digits must pass, noise and
one-image-per-class must fail. The last test samples the embedded model itself.
"""

import importlib.util
import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import math

import pytest
import torch

import fastdiff
from fastdiff import quality

requires_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                      reason="needs scikit-learn (pip install fastdiff[digits])")

LABELS = torch.arange(10).repeat(20)  # (200,) 0..9, 0..9, ... as evaluate_pipeline asks


def real_subset(per_class: int, seed: int = 0):
    """per_class real digits of each class, as (N, 1, 16, 16) images in [0, 1] and labels."""
    images, labels = quality.real_digits()
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
    return images[idx], torch.as_tensor(labels[idx])


# ---------------------------------------------------------------------------------------------
# The measurement itself
# ---------------------------------------------------------------------------------------------

@requires_sklearn
def test_images_to_digits_inverts_the_upsampling_up_to_blur():
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = quality.images_to_digits(quality.real_digits()[0])
    assert features.shape == (1797, 64)
    assert features.min() >= 0 and features.max() <= 1
    # bilinear up then 2×2 average down is a mild blur, not the identity
    assert np.abs(features - digits.data / 16).mean() < 0.1


@pytest.mark.parametrize("shape", [(4, 16, 16), (4, 3, 16, 16), (4, 1, 16, 12), (4, 1, 12, 12)])
def test_images_to_digits_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="images must be"):
        quality.images_to_digits(torch.rand(shape))


def test_images_to_digits_rejects_non_finite():
    images = torch.rand(2, 1, 16, 16)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quality.images_to_digits(images)


@requires_sklearn
@pytest.mark.parametrize("heldout", [False, True])
def test_real_digits_pass(heldout):
    report = quality.baseline_report(heldout=heldout)
    assert report.accuracy >= 0.95
    assert report.mean_confidence >= 0.85
    assert report.diversity == pytest.approx(1.0, abs=0.05)
    assert report.passes()


@requires_sklearn
def test_real_subset_is_about_as_diverse_as_the_data():
    images, labels = real_subset(per_class=20)
    report = quality.evaluate_samples(images, labels)
    assert report.diversity == pytest.approx(1.0, abs=0.15)
    assert all(0.6 < d < 1.4 for d in report.per_class_diversity.values())


@requires_sklearn
def test_noise_fails():
    images = torch.rand(len(LABELS), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    report = quality.evaluate_samples(images, LABELS)
    assert report.accuracy < 0.3  # chance is 0.1
    assert not report.passes()


@requires_sklearn
def test_one_image_per_class_fails_on_diversity():
    images, labels = real_subset(per_class=1)
    report = quality.evaluate_samples(images[LABELS], LABELS)  # labels are 0..9, so image c is class c
    assert report.accuracy >= 0.9  # recognisable ...
    assert report.diversity < 0.01  # ... but collapsed
    assert report.nearest_train_ratio < 0.01  # and copied from the data
    assert not report.passes()


@requires_sklearn
def test_report_counts_per_class():
    images, labels = real_subset(per_class=3)
    wrong = labels.clone()
    wrong[labels == 7] = 1  # ask for 1 where the image is a 7
    report = quality.evaluate_samples(images, wrong)
    assert report.n == 30
    assert 7 not in report.per_class_accuracy
    assert report.per_class_accuracy[1] == pytest.approx(0.5)
    assert report.accuracy == pytest.approx(0.9)
    # 27 right and 3 wrong: the standard error of a 0/1 mean, sample std over sqrt(n)
    assert report.accuracy_se == pytest.approx(math.sqrt(0.9 * 0.1 * 30 / 29 / 30))
    assert 0 < report.confidence_se < 0.2
    row = report.to_markdown_row()
    assert f"± {report.confidence_se:.4f}" in row
    assert row.count("|") == quality.QualityReport.markdown_header().splitlines()[0].count("|")


def test_evaluate_samples_checks_labels():
    with pytest.raises(ValueError, match="labels"):
        quality.evaluate_samples(torch.rand(3, 1, 16, 16), [0, 1])
    with pytest.raises(ValueError, match="0..9"):
        quality.evaluate_samples(torch.rand(2, 1, 16, 16), [0, 10])


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    with pytest.raises(ImportError, match=r"pip install fastdiff\[digits\]"):
        quality._require_sklearn()


@pytest.mark.parametrize("spec, expected", [("ddim-50", ("ddim", 50)), ("DDPM-1000", ("ddpm", 1000)),
                                            ("pndm-50", ("pndm", 50))])
def test_parse_run(spec, expected):
    assert quality.parse_run(spec) == expected


@pytest.mark.parametrize("spec", ["ddim", "ddim-0", "heun-50", "ddim-x"])
def test_parse_run_rejects(spec):
    with pytest.raises(ValueError, match="ddim, ddpm"):
        quality.parse_run(spec)


# ---------------------------------------------------------------------------------------------
# The pipeline plumbing, against a stand-in pipeline that returns noisy real digits
# ---------------------------------------------------------------------------------------------

class FakeScheduler:
    def __init__(self, **config):
        self.config = config

    @classmethod
    def init_keys(cls):
        return ("num_train_timesteps", "timestep_spacing")

    @classmethod
    def from_config(cls, config, **kwargs):
        return cls(**{**config, **kwargs})


class FakeDDIM(FakeScheduler):
    pass


class FakeDDPM(FakeScheduler):
    pass


class StandInPipeline:
    """Answers each requested label with a real digit of that class plus a little noise."""

    def __init__(self):
        self.scheduler = FakeScheduler(num_train_timesteps=1000)
        self.calls = []
        self.broken = False

    def __call__(self, batch_size, num_inference_steps, generator, class_labels, progress, **kwargs):
        if self.broken:
            raise RuntimeError("sampler broke")
        images, labels = quality.real_digits()
        self.calls.append(dict(batch_size=batch_size, steps=num_inference_steps,
                               scheduler=type(self.scheduler), config=self.scheduler.config, **kwargs))
        pick = [np.flatnonzero(labels == int(c)) for c in class_labels]
        idx = [p[torch.randint(len(p), (), generator=generator)] for p in pick]
        noise = 0.05 * torch.randn(batch_size, 1, 16, 16, generator=generator)
        return SimpleNamespace(images=(images[idx] + noise).clamp(0, 1))


@pytest.fixture
def stand_in(monkeypatch):
    pipe = StandInPipeline()
    monkeypatch.setitem(fastdiff.schedulers.SCHEDULERS, "DDIMScheduler", FakeDDIM)
    monkeypatch.setitem(fastdiff.schedulers.SCHEDULERS, "DDPMScheduler", FakeDDPM)
    monkeypatch.setattr(fastdiff, "load_pretrained", lambda name, device=None: pipe, raising=False)
    return pipe


@requires_sklearn
@pytest.mark.parametrize("scheduler, cls", [("ddim", FakeDDIM), ("ddpm", FakeDDPM)])
def test_evaluate_pipeline_swaps_and_restores_the_scheduler(stand_in, scheduler, cls):
    original = stand_in.scheduler
    report = quality.evaluate_pipeline(stand_in, scheduler, num_inference_steps=7, per_class=5,
                                       guidance_scale=2.0, batch_size=16)
    assert stand_in.scheduler is original
    assert [c["batch_size"] for c in stand_in.calls] == [16, 16, 16, 2]
    assert all(c["scheduler"] is cls and c["steps"] == 7 and c["guidance_scale"] == 2.0 for c in stand_in.calls)
    assert all(("eta" in c) == (scheduler == "ddim") for c in stand_in.calls)
    assert report.name == f"{scheduler.upper()}-7" and report.n == 50 and report.seconds >= 0
    assert report.passes()


@requires_sklearn
def test_evaluate_pipeline_restores_the_scheduler_on_error(stand_in):
    original = stand_in.scheduler
    stand_in.broken = True
    with pytest.raises(RuntimeError, match="sampler broke"):
        quality.evaluate_pipeline(stand_in, per_class=1)
    assert stand_in.scheduler is original


@requires_sklearn
def test_main_prints_table_and_writes_json_and_grid(stand_in, tmp_path, capsys):
    status = quality.main(["--runs", "ddim-3", "ddpm-4", "--per-class", "3",
                           "--json", str(tmp_path / "q.json"), "--grid", str(tmp_path / "grid.png")])
    assert status == 0
    table = capsys.readouterr().out
    assert "| DDIM-3 | 30 |" in table and "| DDPM-4 | 30 |" in table and "held-out" in table
    result = json.loads((tmp_path / "q.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["DDIM-3", "DDPM-4"]
    assert result["runs"][0]["passes"] and result["torch"] == torch.__version__

    from PIL import Image

    with Image.open(tmp_path / "grid-ddim-3.png") as grid:
        assert grid.size == (4 * (3 * 17 + 1), 4 * (10 * 17 + 1))  # 3 columns, 10 rows, 1-px gaps, 4×
    assert (tmp_path / "grid-ddpm-4.png").exists()


@requires_sklearn
def test_scheduler_options_reach_every_run_and_the_json(stand_in, tmp_path):
    original = stand_in.scheduler
    assert quality.main(["--runs", "ddim-3", "ddpm-4", "--per-class", "1", "--scheduler-option",
                         "timestep_spacing=trailing", "--json", str(tmp_path / "q.json")]) == 0
    assert [c["scheduler"] for c in stand_in.calls] == [FakeDDIM, FakeDDPM]
    assert all(c["config"] == {"num_train_timesteps": 1000, "timestep_spacing": "trailing"} for c in stand_in.calls)
    assert stand_in.scheduler is original
    assert json.loads((tmp_path / "q.json").read_text())["scheduler_options"] == {"timestep_spacing": "trailing"}


@requires_sklearn
@pytest.mark.parametrize("option, message", [
    ("use_karras_sigmas=true", "--scheduler-option: FakeDDIM takes no option 'use_karras_sigmas'; it takes "
                               "num_train_timesteps, timestep_spacing"),
    ("trailing", "--scheduler-option must look like KEY=VALUE"),
])
def test_a_bad_scheduler_option_is_refused_before_sampling(stand_in, option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        quality.main(["--runs", "ddim-3", "--per-class", "1", "--scheduler-option", option])
    assert stand_in.calls == []


@requires_sklearn
def test_quality_against_steps_is_plotted_and_replotted_from_json(stand_in, tmp_path, capsys):
    from PIL import Image

    status = quality.main(["--runs", "ddim-2", "ddim-4", "ddpm-3", "--per-class", "2", "--json",
                           str(tmp_path / "q.json"), "--plot", str(tmp_path / "steps.png")])
    assert status == 0
    with Image.open(tmp_path / "steps.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 2 * figure.size[1]  # three panels side by side
    capsys.readouterr()
    first = json.loads((tmp_path / "q.json").read_text())
    later = first | {"runs": [first["runs"][0] | {"accuracy": 0.5}]}  # a rerun of DDIM-2 replaces it
    (tmp_path / "later.json").write_text(json.dumps(later))
    status = quality.main(["--from-json", str(tmp_path / "q.json"), str(tmp_path / "later.json"),
                           "--plot", str(tmp_path / "again.png"), "--strict"])
    table = capsys.readouterr().out
    assert status == 1  # the replaced DDIM-2 run misses the bar
    assert "| DDIM-2 | 20 | 0.500 |" in table and "| DDIM-4 | 20 |" in table and "| DDPM-3 | 20 |" in table
    assert "held-out" in table and (tmp_path / "again.png").stat().st_size > 0


def test_reference_distance_is_the_mean_per_image_rms():
    reference = torch.zeros(3, 1, 4, 4)
    images = reference.clone()
    images[0] = 0.5  # RMS 0.5
    images[1, 0, 0, :] = 1.0  # one row of 4 in 16 pixels: RMS 0.5
    assert quality.reference_distance(images, reference) == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert quality.reference_distance(reference, reference) == 0
    with pytest.raises(ValueError, match=r"reference: got \(2, 1, 4, 4\) reference images for \(3, 1, 4, 4\)"):
        quality.reference_distance(images, reference[:2])


@requires_sklearn
def test_runs_are_measured_against_a_reference_run_from_the_same_noise(stand_in, tmp_path, capsys):
    """The stand-in draws the same digits for the same seed whatever the run, so every distance is 0;
    the reference run is sampled first, and gets a fourth panel in the plot."""
    from PIL import Image

    status = quality.main(["--runs", "ddim-2", "ddim-4", "--reference", "ddpm-9", "--per-class", "2", "--json",
                           str(tmp_path / "q.json"), "--plot", str(tmp_path / "steps.png")])
    assert status == 0
    assert [(c["scheduler"], c["steps"]) for c in stand_in.calls] == [(FakeDDPM, 9), (FakeDDIM, 2), (FakeDDIM, 4)]
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["reference"] == "ddpm-9" and [r["reference_rms"] for r in result["runs"]] == [0.0, 0.0]
    assert "| 0.0000 |" in capsys.readouterr().out
    with Image.open(tmp_path / "steps.png") as figure:
        assert figure.size[0] > 3.5 * figure.size[1]  # four panels side by side
    with pytest.raises(ValueError, match="SCHEDULER-STEPS"):
        quality.main(["--runs", "ddim-2", "--reference", "dpm-200"])


@requires_sklearn
def test_replot_errors(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"runs": "none"}))
    with pytest.raises(ValueError, match="give one of them"):
        quality.main(["--from-json", str(tmp_path / "other.json"), "--runs", "ddim-5"])
    with pytest.raises(ValueError, match="--reference samples new runs"):
        quality.main(["--from-json", str(tmp_path / "other.json"), "--reference", "ddim-5"])
    with pytest.raises(ValueError, match="not a quality result"):
        quality.main(["--from-json", str(tmp_path / "other.json")])
    with pytest.raises(ValueError, match="--plot"):
        quality.main(["--from-json", str(tmp_path / "other.json"), "--plot", str(tmp_path / "steps.jpgx")])


@requires_sklearn
def test_main_runs_a_real_untrained_pipeline(tmp_path, capsys):
    """The real DiffusionPipeline's keywords and scheduler swap (no quality expected: random weights)."""
    torch.manual_seed(0)
    unet = fastdiff.UNet2D(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           layers_per_block=1, attention_resolutions=(), norm_num_groups=4, dropout=0.0,
                           num_classes=10).eval()
    pipe = fastdiff.DiffusionPipeline(unet, fastdiff.DDIMScheduler(num_train_timesteps=20), guidance_scale=2.0)
    pipe.save_pretrained(tmp_path / "tiny")
    status = quality.main(["--model", str(tmp_path / "tiny"), "--runs", "ddim-3", "ddpm-20",
                           "--per-class", "2", "--device", "cpu", "--strict"])
    table = capsys.readouterr().out
    assert "| DDIM-3 | 20 |" in table and "| DDPM-20 | 20 |" in table
    assert status == 1  # random weights miss the bar, and --strict says so


# ---------------------------------------------------------------------------------------------
# The embedded model (the acceptance check)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_model_draws_the_requested_digits():
    """DDIM-50, 10 samples per digit. Fails (does not skip) if the model or pipeline is missing.

    Real held-out digits score ≈0.99 accuracy and ≈0.9 confidence, so the issue's 0.9 / 0.8 leaves
    room for sampling error at 100 samples (one binomial sd of accuracy at p = 0.95 is ≈0.02).
    Diversity ≥ 0.5: a model drawing one image per class scores ≈0, a class mean plus pixel noise
    ≈0.2–0.3, real digits 1.0; guidance narrows the spread, so ask for half the data's.
    """
    pytest.importorskip("sklearn")
    pipe = fastdiff.load_pretrained("digits")
    report = quality.evaluate_pipeline(pipe, "ddim", num_inference_steps=50, per_class=10, batch_size=100)
    print(quality.QualityReport.markdown_header(), report.to_markdown_row(), sep="\n")
    assert report.accuracy >= 0.9, report
    assert report.mean_confidence >= 0.8, report
    assert report.diversity >= quality.MIN_DIVERSITY, report
