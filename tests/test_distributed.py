"""FSDP2 across local processes, exact resume, failures, export (CPU, gloo)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import (assert_bit_identical_runs, ROOT, compose_config, launch_background, read_metrics, run_launch,
                      train_here, wait_for_records)
from distill.config import validate

LOSS_KEYS = ("loss/student", "loss/critic", "grad_norm/student", "grad_norm/critic")


def exported(run, role="student"):
    return load_file(run / "export" / role / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_same_metrics(a, b, rel):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in LOSS_KEYS:
            if key in x:
                assert abs(x[key] - y[key]) <= rel * abs(x[key]), (x["step"], key, x[key], y[key])


@pytest.mark.multiprocess
def test_two_process_fsdp_matches_one_process(tmp_path):
    """Also with FastGen's per-sample student steps and Self-Forcing's critic on the next
    batch: the draws follow the sample ids and both ranks take the extra batch together."""
    one, two = tmp_path / "one", tmp_path / "two"
    steps = ["training.max_steps=6", "method.rollout=data", "method.student_step_draw=per_sample",
             "method.critic_sample=fresh_batch", "method.generator_update_interval=2"]
    train_here([*steps, "data.batch_size=4", f"hydra.run.dir={one}"])
    r2 = run_launch([*steps, "data.batch_size=2", "launcher.nproc_per_node=2", f"hydra.run.dir={two}"])
    assert r2.returncode == 0, r2.stderr
    assert "rank 1 of 2" in (two / "logs" / "rank-1.log").read_text()
    assert len(list((two / "checkpoint-6" / "state").glob("shard-*.safetensors"))) == 2
    assert_same_metrics(read_metrics(one), read_metrics(two), rel=1e-5)
    drawn = [[r.get("student_step") for r in read_metrics(run)] for run in (one, two)]
    assert drawn[0] == pytest.approx(drawn[1])  # the mean of the per-sample steps, over ranks


def test_one_rank_shards_when_asked_and_matches_the_unsharded_run(tmp_path):
    """parallel.shard_single_rank: FSDP2 over a process group of one (gloo here, NCCL on a GPU)."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    common = ["training.max_steps=4", "roles.student.ema_decay=0.9", "checkpoint.every=2"]
    r1 = run_launch([*common, f"hydra.run.dir={plain}"])
    r2 = run_launch([*common, "parallel.shard_single_rank=true", f"hydra.run.dir={sharded}"])
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert "FSDP2-sharded" in (sharded / "launch.log").read_text()
    assert "FSDP2-sharded" not in (plain / "launch.log").read_text()
    assert_same_metrics(read_metrics(plain), read_metrics(sharded), rel=1e-5)
    for role in ("student", "critic", "student_ema"):
        a, b = exported(plain, role), exported(sharded, role)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, role


@pytest.mark.multiprocess
def test_hsdp_with_grad_accumulation_and_checkpointing_matches_one_process(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    common = ["training.max_steps=3", "training.grad_accum_steps=2", "method.generator_update_interval=2"]
    train_here([*common, "data.batch_size=4", f"hydra.run.dir={one}"])
    r4 = run_launch(
        [
            *common,
            "data.batch_size=1",
            "launcher.nproc_per_node=4",
            "parallel.replicate=2",
            "roles.student.activation_checkpointing=full",
            "roles.critic.activation_checkpointing=full",
            f"hydra.run.dir={four}",
        ]
    )
    assert r4.returncode == 0, r4.stderr
    assert_same_metrics(read_metrics(one), read_metrics(four), rel=1e-5)


@pytest.mark.multiprocess
def test_stopped_and_resumed_run_is_bit_identical(tmp_path):
    """2 processes: 8 steps straight, against 4 steps then a second launch
    into the same folder that resumes by itself for 4 more."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["launcher.nproc_per_node=2", "method.generator_update_interval=3", "roles.student.ema_decay=0.9"]
    assert run_launch([*common, "training.max_steps=8", f"hydra.run.dir={straight}"]).returncode == 0
    first = run_launch([*common, "training.max_steps=4", f"hydra.run.dir={resumed}"])
    assert first.returncode == 0, first.stderr
    second = run_launch([*common, "training.max_steps=8", f"hydra.run.dir={resumed}"])
    assert second.returncode == 0, second.stderr
    assert "resumed from" in (resumed / "launch.log").read_text()
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 9))
    assert_bit_identical_runs(straight, resumed)


def _pid_of(log, rank, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file():
            match = re.search(rf"rank {rank} of \d+, pid (\d+)", log.read_text())
            if match:
                return int(match.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no pid line in {log}")


@pytest.mark.multiprocess
def test_killed_rank_ends_the_run_naming_the_rank(tmp_path):
    run = tmp_path / "run"
    proc = launch_background(["launcher.nproc_per_node=2", "training.max_steps=100000", f"hydra.run.dir={run}"])
    try:
        wait_for_records(run, 3)
        os.kill(_pid_of(run / "logs" / "rank-1.log", 1), signal.SIGKILL)
        killed_at = time.time()
        _, stderr = proc.communicate(timeout=60)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "rank 1 failed with exit code -9" in stderr
    assert elapsed < 30, elapsed


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path):
    """SIGKILL the whole run while a checkpoint is being written; the next
    launch resumes from the newest complete one and ends where an
    uninterrupted run ends."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    common = ["training.max_steps=40", "checkpoint.every=2", "checkpoint.keep_last=0"]
    proc = launch_background([*common, f"hydra.run.dir={run}"])
    caught = None
    try:
        while proc.poll() is None and caught is None:
            names = os.listdir(run) if run.is_dir() else []
            if any(n.startswith("checkpoint-") and n[-1].isdigit() for n in names):  # one complete already
                caught = next((n for n in names if n.endswith(".tmp")), None)
            if caught:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert caught, "the run ended before any save could be interrupted"
    complete = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if p.name[-1].isdigit())
    half_written = int(caught.split("-")[1].split(".")[0])
    assert half_written not in complete and max(complete) < half_written
    result = run_launch([*common, f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    assert f"resumed from {run / f'checkpoint-{max(complete)}'}" in (run / "launch.log").read_text()
    assert not list(run.glob("*.tmp"))
    assert run_launch([*common, f"hydra.run.dir={reference}"]).returncode == 0
    wa, wb = exported(run), exported(reference)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_export_loads_with_from_pretrained_and_matches_the_student(tmp_path):
    from diffusers import WanTransformer3DModel

    from distill.run import train

    config = validate(compose_config(["training.max_steps=6", "method.generator_lr=1e-3"]))
    trainer = train(config, tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "export" / "student", subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, *config.model.latent_shape), generator=g)
    text = torch.randn((1, config.model.text_len, config.model.text_dim), generator=g)
    t = torch.tensor([500.0])
    trained = trainer.roles["student"].module.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        want = trainer.roles["student"].module(x, t, text, return_dict=False)[0]
        got = loaded(x, t, text, return_dict=False)[0]
    # same weights; the kernels may sum in another order for another memory layout
    assert torch.allclose(want, got, rtol=0, atol=1e-5)
    scheduler = json.loads((tmp_path / "export" / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["stochastic_sampling"]
    sigmas = json.loads((tmp_path / "export" / "student" / "distill.json").read_text())["sampler"]["sigmas"]
    assert len(sigmas) == 3 and sigmas[0] == 1.0 and scheduler["shift_terminal"] == pytest.approx(sigmas[-1])


def test_sample_command_runs_the_student_steps(tmp_path):
    run = tmp_path / "run"
    assert run_launch(["training.max_steps=2", "method.student_steps=[1000,500]", f"hydra.run.dir={run}"]).returncode == 0
    out, latents = tmp_path / "samples.gif", tmp_path / "samples.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "distill.sample", str(run / "export" / "student"), "--out", str(out),
         "--prompt", "a red square", "--prompt", "a blue square", "--seeds", "0", "1", "--latents", str(latents)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "4 samples in 2 steps" in result.stdout
    saved = load_file(latents)
    assert saved["samples"].shape == (4, 16, 3, 16, 16) and torch.isfinite(saved["samples"]).all()
    assert torch.equal(saved["text_embeds"][0], saved["text_embeds"][1])  # one prompt, two seeds
    assert not torch.equal(saved["samples"][0], saved["samples"][1])
    from PIL import Image

    assert Image.open(out).n_frames == 3  # the identity "VAE": 3 latent frames


def test_checkpoints_hold_only_safetensors_json_and_yaml_and_load_without_pickle(tmp_path, monkeypatch):
    import pickle

    from distill.run import train

    config = validate(compose_config(["training.max_steps=2", "roles.critic.ema_decay=0.5"]))
    train(config, tmp_path)
    files = [p for p in (tmp_path / "checkpoint-2").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} <= {".safetensors", ".json", ".yaml"}

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    resumed = validate(compose_config(["training.max_steps=3", "roles.critic.ema_decay=0.5"]))
    trainer = train(resumed, tmp_path)
    assert trainer.step == 3


def test_ema_follows_hand_computed_average():
    from torch import nn

    from distill.ema import EMA

    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema = EMA(module, decay=0.9, start_step=1)
    for step, value in ((1, 2.0), (2, 4.0), (3, 0.0)):
        with torch.no_grad():
            module.weight.fill_(value)
        ema.update(module, step)
    # step 1 copies (2.0); step 2: 0.9 * 2 + 0.1 * 4 = 2.2; step 3: 0.9 * 2.2 = 1.98
    assert torch.allclose(ema.state_dict()["weight"], torch.tensor([[1.98]]))


def test_a_rank_that_crashes_in_native_code_leaves_its_python_stacks_in_its_log(tmp_path):
    """A fatal signal (here SIGSEGV, as glibc's heap checks raise SIGABRT) writes every
    thread's Python stack into the rank's log before the process dies."""
    code = ("import os, signal, sys; from pathlib import Path; from distill.worker import setup_logging; "
            "setup_logging(Path(sys.argv[1]), 1); os.kill(os.getpid(), signal.SIGSEGV)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGSEGV
    log = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "Fatal Python error: Segmentation fault" in log and 'File "<string>", line 1 in <module>' in log
