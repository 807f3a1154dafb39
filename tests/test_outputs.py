"""What a user reads and looks at: log lines, captioned grids, the Frechet
distance, prompt-to-GIF sampling with the shipped demo student, --help."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, compose_config, launch_as_typed, read_metrics, run_launch
from distill.config import validate
from distill.tracking import MetricWindow
from distill.validation.media import CAPTION_HEIGHT, PAD, save_grid

DEMO_STUDENT = ROOT / "assets" / "digits_student"


def test_a_log_line_holds_the_window_means_and_the_peak_memory_maximum():
    window = MetricWindow()
    window.add({"loss/critic": 1.0, "loss/student": 10.0, "peak_memory_gb": 2.0})
    for value, memory in ((2.0, 3.0), (6.0, 1.0)):
        window.add({"loss/critic": value, "peak_memory_gb": memory})
    assert window.flush() == {"loss/critic": 3.0, "loss/student": 10.0, "peak_memory_gb": 3.0}
    window.add({"loss/critic": 5.0})
    assert window.flush() == {"loss/critic": 5.0}  # a fresh window


def test_device_values_are_summed_as_tensors_and_read_once_through_the_rank_mean():
    window = MetricWindow()
    for loss, norm in ((1.0, 4.0), (2.0, 8.0)):
        window.add({"loss/critic": torch.tensor(loss), "grad_norm/critic": torch.tensor(norm), "lr/critic": 0.5})
    assert all(torch.is_tensor(window.sums[k]) for k in ("loss/critic", "grad_norm/critic"))
    reduced = []
    means = window.flush(lambda values: reduced.append(values.clone()) or values / 2)  # as 2 ranks, one with zeros
    assert means == {"loss/critic": 0.75, "grad_norm/critic": 3.0, "lr/critic": 0.5}
    assert len(reduced) == 1 and reduced[0].tolist() == [12.0, 3.0]  # one transfer, keys sorted alike on every rank


def test_every_log_line_of_the_demo_shows_every_role(demo_run):
    """Generator every 5 iterations, a line every 25: both roles on every line."""
    config = validate(compose_config(["experiment=digits_demo"]))
    assert (config.method.generator_update_interval, config.training.log_every) == (5, 25)
    records = read_metrics(demo_run)
    assert records and all(r["step"] % 25 == 0 for r in records)
    for r in records:
        for key in ("loss/student", "grad_norm/student", "lr/student", "loss/critic", "grad_norm/critic", "lr/critic"):
            assert np.isfinite(r[key]), (r["step"], key)


def test_the_demo_is_healthy_by_its_own_statistics(demo_run):
    """Every validation logs the student's and the teacher's health statistics, and the
    plain demo raises no health finding."""
    records = read_metrics(demo_run, validation=True)
    student = [r for r in records if "val/student_2step/motion" in r]
    assert student and all(r["val/student_2step/diversity"] > 0 for r in student)
    assert any("val/teacher_50step/motion" in r for r in records)
    assert "health at step" not in (demo_run / "launch.log").read_text()


def test_the_demo_runs_grids_caption_every_prompt_and_its_export_samples_by_prompt(demo_run, tmp_path):
    """The shared demo run's grids keep their prompts; its exported student samples by
    prompt through `distill.sample`; relaunching the finished run trains nothing."""
    from distill.sample import main

    steps = read_metrics(demo_run)[-1]["step"]
    grid = Image.open(demo_run / "samples" / f"student_2step-step{steps:06d}.png")
    prompts = json.loads(grid.text["captions"])
    assert len(prompts) == 16 and all(p.startswith("the digit ") for p in prompts)  # a grid shows the first 16
    out = tmp_path / "seven.gif"
    assert main([str(demo_run / "export" / "student"), "--prompt", "the digit 7 moving left", "--out", str(out)]) == 0
    assert _gif_clip(out).shape == (4, 16, 16)
    # its model card: no stock pipeline for the demo's word vectors and pixel latents, the last scores
    card = (demo_run / "export" / "student" / "README.md").read_text()
    last = read_metrics(demo_run, validation=True)[-1]
    assert "python -m distill.sample" in card and not (demo_run / "export" / "student" / "model_index.json").exists()
    assert f"| student_2step/accuracy | {last['val/student_2step/accuracy']:.4g} |" in card
    assert "sampling: 2 steps at sigmas [1, 0.5]" in card
    run = shutil.copytree(demo_run, tmp_path / "run")  # other tests read the shared run meanwhile
    metrics = (run / "metrics.jsonl").read_bytes()
    again = launch_as_typed([f"hydra.run.dir={run}"])
    assert again.returncode == 0, again.stderr
    assert f"is finished at step {steps}" in again.stdout
    assert (run / "metrics.jsonl").read_bytes() == metrics and not (run / f"checkpoint-{steps + 1}").exists()


def test_grid_captions_every_clip_and_keeps_the_prompts(tmp_path):
    clips = torch.rand(5, 1, 3, 8, 8) * 2 - 1
    prompts = [f"the digit {k} moving left" for k in range(5)]
    captioned, bare = save_grid(clips, tmp_path / "c.png", prompts, per_row=2), save_grid(clips, tmp_path / "b.png", per_row=2)
    image = Image.open(captioned)
    assert json.loads(image.text["captions"]) == prompts
    plain = Image.open(bare)
    assert "captions" not in plain.text
    # 3 rows of 2 tiles; a tile is a clip's 3 frames side by side, 8x8 enlarged 8 times (to 64 pixels high)
    tile_w, tile_h, rows = 3 * 8 * 8, 8 * 8, 3
    assert image.size == (2 * (tile_w + PAD) + PAD, rows * (tile_h + CAPTION_HEIGHT + PAD) + PAD)
    assert plain.size == (2 * (tile_w + PAD) + PAD, rows * (tile_h + PAD) + PAD)
    pixels = np.asarray(image.convert("L"))
    for row in range(rows):
        band = pixels[PAD + row * (tile_h + CAPTION_HEIGHT + PAD) + tile_h:][:CAPTION_HEIGHT, PAD:PAD + tile_w]
        assert (band < 100).any(), f"no caption text under row {row}"
    empty = pixels[-CAPTION_HEIGHT - PAD:-PAD, PAD + tile_w + PAD:-PAD]  # the sixth slot has no clip
    assert (empty == 255).all()


def test_frechet_distance_matches_scipy_and_is_silent_on_singular_covariances():
    from scipy import linalg

    from distill.validation.digit_metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m1, m2 = a.mean(0), b.mean(0)
    reference = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)
    singular = np.cov(rng.normal(size=(3, 6)), rowvar=False)  # rank 2 of 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = frechet_distance(m1, singular, m2, s2)
    assert np.isfinite(value) and value > 0


def _gif_clip(path):
    """The single clip of a one-prompt GIF: [T, 16, 16] in [-1, 1] (tile cut out, scale undone)."""
    image = Image.open(path)
    frames = []
    for i in range(image.n_frames):
        image.seek(i)
        gray = np.asarray(image.convert("L"), dtype=np.float32)
        tile = gray[PAD:image.height - PAD - CAPTION_HEIGHT, PAD:image.width - PAD]
        scale = tile.shape[0] // 16
        frames.append(tile[::scale, ::scale][:16, :16] / 127.5 - 1)
    return torch.tensor(np.stack(frames))


def test_sampling_the_demo_student_by_prompt_draws_the_prompted_digit(tmp_path):
    from distill.sample import main
    from distill.validation.digit_metrics import DigitMetrics

    metrics = DigitMetrics()
    correct = 0
    for digit in range(10):
        for direction in ("left", "right", "up", "down"):
            out = tmp_path / f"{digit}-{direction}.gif"
            assert main([str(DEMO_STUDENT), "--prompt", f"the digit {digit} moving {direction}", "--out", str(out)]) == 0
            clip = _gif_clip(out)
            assert clip.shape == (4, 16, 16)
            with torch.no_grad():
                logits = metrics.model(clip[:, None]).mean(dim=0)
            correct += int(logits.argmax()) == digit
    print(f"{correct} of 40 clips show the prompted digit")
    # 31 here; the student scores 0.906 on the 256 validation prompts, chance is 0.1
    assert correct >= 26, correct


def test_sample_refuses_what_it_cannot_do_in_one_line(tmp_path):
    from distill.sample import main

    assert main([str(DEMO_STUDENT), "--out", str(tmp_path / "x.gif")]) == 2  # no prompt
    assert main([str(DEMO_STUDENT), "--prompt", "the digit 1", "--out", str(tmp_path / "x.avi")]) == 2
    assert main([str(DEMO_STUDENT), "--prompt", "the digit 1", "--steps", "9", "--out", str(tmp_path / "x.gif")]) == 2


def test_help_is_the_projects_own_page():
    result = run_launch(["--help"])
    assert result.returncode == 0, result.stderr
    page = result.stdout
    assert "compose, validate and run a few-step diffusion distillation" in page
    assert "schema/" not in page and not any(line.startswith("  schema") for line in page.splitlines())
    for group in sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir()):
        assert f"  {group}:" in page, group
    for option in ("digits_demo", "wan21_t2v_1.3b_dmd2_3step", "dmd2_digits", "+sweep:", "digits_lr",
                   "python launch.py hydra.run.dir=RUN", "Exit codes", "plan=true", "parallel.context=2"):
        assert option in page, option
