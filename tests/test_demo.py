"""The embedded default: the shipped digits teacher distilled with DMD2."""

import os
import subprocess
import sys

import pytest

import distill.methods.dmd2 as dmd2
from conftest import ROOT, compose_config, read_metrics
from distill.config import validate
from distill.run import train

SHORT = [
    "experiment=digits_demo",  # the default run, shortened
    "training.max_steps=750",
    "validation.every=250",
    "validation.num_samples=128",
    "validation.teacher_steps=2",  # the reference here is the teacher at the student's 2 steps
    "checkpoint.every=100000",
    "training.export_at_end=false",
]
GAN = ["method.gan.enabled=true"]


def distil(tmp_path, overrides=()):
    """The last validation's scores, and the student's averaged over its last 2
    validations (steps 500, 750) as `student_last2/...`."""
    trainer = train(validate(compose_config([*SHORT, *overrides])), tmp_path)
    m = {k.split("/", 1)[1]: v for k, v in trainer.validator.history.items()}
    records = [r for r in read_metrics(tmp_path, validation=True) if "val/student_2step/accuracy" in r][-2:]
    for key in ("accuracy", "frechet_distance"):
        m[f"student_last2/{key}"] = sum(r[f"val/student_2step/{key}"] for r in records) / len(records)
    return m


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return distil(tmp_path_factory.mktemp("plain"))


def test_short_distillation_beats_the_teacher_at_two_steps(plain):
    m = plain
    assert m["student_2step/frechet_distance"] < 0.85 * m["teacher_2step/frechet_distance"], m
    assert m["student_2step/accuracy"] > m["teacher_2step/accuracy"] + 0.1, m


def test_the_gan_term_lowers_the_frechet_distance_of_the_short_run(plain, tmp_path):
    m = distil(tmp_path, GAN)
    assert m["student_last2/frechet_distance"] < plain["student_last2/frechet_distance"], (m, plain)
    assert m["student_last2/accuracy"] > m["teacher_2step/accuracy"] + 0.1, m


def test_negative_control_with_flipped_gradient_does_not(tmp_path, monkeypatch):
    """The DMD gradient flipped, the GAN term on: the student must still fail."""
    original = dmd2.dmd_gradient
    monkeypatch.setattr(dmd2, "dmd_gradient", lambda *args: -original(*args))
    m = distil(tmp_path, GAN)
    assert m["student_2step/frechet_distance"] > m["teacher_2step/frechet_distance"], m
    assert m["student_2step/accuracy"] < m["teacher_2step/accuracy"], m


def test_default_launch_composes_to_the_demo_and_runs(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["training.max_steps=2", "validation.num_samples=8", "validation.teacher_steps=3", "logger=none",
            f"hydra.run.dir={run}"]
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "assets/digits_teacher" in config and "student_steps:\n  - 1000\n  - 500" in config
    assert "name: digits" in config
    assert [r["step"] for r in read_metrics(run)] == [2]  # the demo logs every 25 steps and the last
    for name in ("teacher_3step", "teacher_2step", "real", "student_2step-step000002"):
        assert (run / "samples" / f"{name}.png").is_file() and (run / "samples" / f"{name}.gif").is_file()
    table = result.stdout
    for row in ("real", "student_2step", "teacher_2step", "teacher_3step"):
        assert row in table
    assert "accuracy" in table and "frechet_distance" in table and f"samples: {run / 'samples'}" in table
    assert (run / "loss_curves.png").stat().st_size > 1000


def test_wandb_offline_run_holds_logged_keys_and_media(tmp_path):
    run = tmp_path / "run"
    config = validate(compose_config(["logger=wandb", "logger.mode=offline", "training.max_steps=3"]))
    train(config, run)
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"loss/critic", b"loss/student", b"grad_norm/critic", b"lr/student", b"samples_per_s", b"peak_memory_gb"):
        assert key in data, key
    media = runs[0] / "files" / "media"
    assert list(media.rglob("*.png")) and list(media.rglob("*.gif"))
    assert (run / "wandb_id.txt").read_text().strip() in runs[0].name
    # a resumed run continues the same wandb run
    train(validate(compose_config(["logger=wandb", "logger.mode=offline", "training.max_steps=4"])), run)
    assert len({p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}) == 1


# --- the autoregressive variant: ODE init, then Self-Forcing DMD (experiment=digits_ar) ---
AR = ["experiment=digits_ar", "training.max_steps=1000", "validation.every=500", "validation.num_samples=128",
      "validation.teacher_steps=2", "checkpoint.every=100000", "training.export_at_end=false"]


@pytest.fixture(scope="module")
def ode_student(tmp_path_factory):
    """The causal student after ODE init on pairs of the 512 validation prompts (a short stand-in
    for the full demo's 8,192 training prompts)."""
    from distill.ode_pairs import main

    root = tmp_path_factory.mktemp("ar")
    assert main([str(root / "pairs"), "--batch-size", "128", "experiment=digits_ar_ode_init", "data.split=val"]) == 0
    train(validate(compose_config(["experiment=digits_ar_ode_init", "data=parquet", f"data.path={root / 'pairs'}",
                                   "training.max_steps=400"])), root / "ode")
    return root / "ode" / "export" / "student"


def distil_ar(tmp_path, student):
    trainer = train(validate(compose_config([*AR, f"roles.student.path={student}"])), tmp_path)
    records = [r for r in read_metrics(tmp_path, validation=True) if "val/student_2step/accuracy" in r]
    return {k.split("/", 1)[1]: v for k, v in trainer.validator.history.items()}, records


def test_autoregressive_student_beats_the_teacher_at_two_steps(ode_student, tmp_path):
    """2 chunks of 2 frames, 2 steps each, generated chunk by chunk over the KV cache."""
    m, records = distil_ar(tmp_path, ode_student)
    assert m["student_2step/accuracy"] > m["teacher_2step/accuracy"] + 0.1, m
    first, last = records[0], records[-1]
    assert last["val/student_2step/frechet_distance"] < first["val/student_2step/frechet_distance"], records


def test_autoregressive_negative_control_with_flipped_gradient_does_not(ode_student, tmp_path, monkeypatch):
    original = dmd2.dmd_gradient
    monkeypatch.setattr(dmd2, "dmd_gradient", lambda *args: -original(*args))
    m, _ = distil_ar(tmp_path, ode_student)
    assert m["student_2step/accuracy"] < m["teacher_2step/accuracy"], m
    assert m["student_2step/frechet_distance"] > m["teacher_2step/frechet_distance"], m


# --- the image-to-video variant (experiment=digits_i2v) ---
I2V = ["experiment=digits_i2v", "training.max_steps=750", "validation.every=750", "validation.num_samples=512",
       "validation.teacher_steps=2", "checkpoint.every=100000", "training.export_at_end=false"]


def test_image_to_video_student_beats_the_teacher_at_two_steps(tmp_path):
    """The first frame given, digits moving 1 or 2 px per frame (the prompt does not say which):
    the teacher at 2 steps blends both continuations; the student keeps the digit and moves it."""
    trainer = train(validate(compose_config(I2V)), tmp_path)
    m = {k.split("/", 1)[1]: v for k, v in trainer.validator.history.items()}
    assert m["real/motion_error"] < 1e-4 and m["real/direction_accuracy"] == 1.0, m
    assert m["student_2step/accuracy"] > m["teacher_2step/accuracy"] + 0.01, m  # frames 2-4, each alone
    assert m["student_2step/direction_accuracy"] >= m["teacher_2step/direction_accuracy"], m
    assert m["student_2step/motion_error"] < m["teacher_2step/motion_error"] - 0.03, m
