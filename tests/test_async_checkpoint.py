"""Checkpoints written in the background (checkpoint.async_save)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_bit_identical_runs, quiet, read_metrics, run_launch
from distill.checkpoint import COMPLETE_MARKER, Checkpointer
from distill.config.schema import CheckpointConfig
from distill.distributed import Runtime

ASYNC = ["checkpoint.async_save=true", "checkpoint.every=2", "roles.student.ema_decay=0.9", "training.max_steps=6"]

# launch.py, with every second write of the shared state held until the process is killed
SLOW_SECOND_WRITE = """
import runpy, sys, time
from torch.distributed.checkpoint import HuggingFaceStorageWriter
write, calls = HuggingFaceStorageWriter.write_data, []
def held(self, plan, planner):
    calls.append(1)
    if len(calls) == 2:
        print("HELD", flush=True)
        time.sleep(600)
    return write(self, plan, planner)
HuggingFaceStorageWriter.write_data = held
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Weights:
    def __init__(self):
        self.w = torch.arange(6.0)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w.copy_(state["w"])


def test_save_returns_once_staged_and_the_checkpoint_holds_the_state_of_that_moment(tmp_path):
    part = Weights()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True), Runtime(), fingerprint={})
    ckpt.register("part", part)
    ckpt.save(3)
    part.w.mul_(10)  # training goes on while the write is in flight
    ckpt.wait()
    assert (tmp_path / "checkpoint-3" / COMPLETE_MARKER).is_file() and not (tmp_path / "checkpoint-3.tmp").exists()
    assert ckpt.load(ckpt.latest()) == 3
    assert part.w.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    ckpt.close()


def test_the_device_decides_by_default():
    assert not Checkpointer(Path("x"), CheckpointConfig(), Runtime(), {}).background
    assert Checkpointer(Path("x"), CheckpointConfig(), Runtime(device=torch.device("cuda", 0)), {}).background
    assert not Checkpointer(Path("x"), CheckpointConfig(async_save=False), Runtime(device=torch.device("cuda", 0)), {}).background


def test_kill_during_the_background_write_then_resume_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_launch([*ASYNC, f"hydra.run.dir={straight}"]).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SECOND_WRITE, str(ROOT / "launch.py"),
                             *quiet([*ASYNC, f"hydra.run.dir={killed}"])], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            if "HELD" in line or time.time() > deadline:
                break
        assert "HELD" in line, "the second checkpoint write never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (killed / "checkpoint-2" / COMPLETE_MARKER).is_file()
    assert (killed / "checkpoint-4.tmp").is_dir() and not (killed / "checkpoint-4.tmp" / COMPLETE_MARKER).exists()
    assert not (killed / "checkpoint-4").exists()
    resumed = run_launch([*ASYNC, f"hydra.run.dir={killed}"])
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint-2 (step 2)" in (killed / "launch.log").read_text()
    assert not (killed / "checkpoint-4.tmp").exists()  # the next save cleared the partial one
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 7))
    assert_bit_identical_runs(straight, killed)


@pytest.mark.multiprocess
def test_two_ranks_write_in_the_background_as_they_would_in_the_foreground(tmp_path):
    background, foreground = tmp_path / "async", tmp_path / "sync"
    two = ["launcher.nproc_per_node=2", "data.batch_size=2"]
    r1 = run_launch([*two, *ASYNC, f"hydra.run.dir={background}"])
    r2 = run_launch([*two, *ASYNC, "checkpoint.async_save=false", f"hydra.run.dir={foreground}"])
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    assert [p.name for p in sorted(background.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert len(list((background / "checkpoint-6" / "state").glob("shard-*.safetensors"))) == 2
    assert_bit_identical_runs(foreground, background)
