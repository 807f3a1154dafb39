"""Context parallelism (Ulysses over parallel.context) equals one rank: losses,
updated weights, validation samples; with FSDP over data ranks, HSDP, the GAN
head, teacher offload; and resume under it is bit-exact (CPU, gloo)."""

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_bit_identical_runs, read_metrics, run_launch, train_here

# One CI run saw rank 0 of the 4-process HSDP run abort in glibc ("malloc(): unaligned
# tcache chunk detected": a write into freed heap memory) at its third iteration. Not
# reproduced since: 11 local runs, 8 of this very config beside 4-6 busy processes on the
# 2 cores, 6 under glibc's malloc checks (libc_malloc_debug.so, MALLOC_CHECK_=3,
# MALLOC_PERTURB_), a pure-torch stress of the same collectives (1,000 iterations x 4
# ranks under the malloc checks), and the whole cp2_hsdp run with rank 0, then rank 1,
# under valgrind's memcheck (every native library instrumented, freed blocks kept 2 GB
# deep): no invalid read, write or free in any library, only the dynamic loader's 4 known
# strncmp over-reads at dlopen. The project's code hands no memory to native code (no
# ctypes or cffi, every frombuffer copied, no storage resizing outside the meta-device
# planner) and its own collectives are synchronous; the threads that run native code
# beside the training thread here are gloo's, inside torch 2.13.0+cpu (libtorch_cpu.so),
# which run diffusers' 0.42 Ulysses all-to-alls and the plan's all-gathers (functional
# collectives, awaited before use). Corrupting the heap takes native code, and the project
# has none; a race between those threads is what memcheck, which runs one thread at a
# time, cannot provoke. So a rank that dies by SIGABRT, SIGBUS or SIGSEGV is run once
# more; any Python error, or a second crash, fails the test. A crashing rank writes every
# thread's Python stack into its log (distill/worker.py), so a repeat names the call.
pytestmark = [pytest.mark.multiprocess,
              pytest.mark.flaky(reruns=1, only_rerun=[r"failed with exit code -(6|7|11)\b"])]

# DMD2 on the tiny Wan (2 heads, 192 tokens) with the GAN head on the critic, so
# that gathered block features and the head's gradients are exercised too
COMMON = ["training.max_steps=4", "method.generator_update_interval=2", "method.gan.enabled=true",
          "method.gan.blocks=[0,1]"]
VARIANTS = {
    "cp2": ["data.batch_size=2", "launcher.nproc_per_node=2", "parallel.context=2", "roles.teacher.cpu_offload=true"],
    "cp2_shard2": ["data.batch_size=1", "launcher.nproc_per_node=4", "parallel.context=2"],
    "cp2_hsdp": ["data.batch_size=1", "launcher.nproc_per_node=4", "parallel.context=2", "parallel.replicate=2",
                 "roles.student.activation_checkpointing=full", "roles.critic.activation_checkpointing=full"],
}


def weights(run, role):
    return load_file(run / "export" / role / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_here([*COMMON, "data.batch_size=2", f"hydra.run.dir={tmp_path_factory.mktemp('cp') / 'one'}"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_context_parallel_run_equals_one_rank(reference, tmp_path, name):
    run = tmp_path / name
    result = run_launch([*COMMON, *VARIANTS[name], f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    ours, ref = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b in zip(ours, ref):
        for key in b:
            if key.startswith(("loss/", "grad_norm/", "gan/")):
                assert abs(a[key] - b[key]) <= 1e-5 * max(abs(b[key]), 1e-3), (a["step"], key, a[key], b[key])
    for role in ("student", "critic"):
        mine, theirs = weights(run, role), weights(reference, role)
        assert mine.keys() == theirs.keys()
        assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-5
    # the end-of-run validation sampled the student on every rank of the group alike
    for png in ("student_3step-step000004.png",):
        a = np.asarray(Image.open(run / "samples" / png), dtype=np.int16)
        b = np.asarray(Image.open(reference / "samples" / png), dtype=np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_context_parallel_resume_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["launcher.nproc_per_node=2", "parallel.context=2", "data.batch_size=2",
              "method.generator_update_interval=3", "roles.student.ema_decay=0.9"]
    assert run_launch([*common, "training.max_steps=6", f"hydra.run.dir={straight}"]).returncode == 0
    assert run_launch([*common, "training.max_steps=3", f"hydra.run.dir={resumed}"]).returncode == 0
    second = run_launch([*common, "training.max_steps=6", f"hydra.run.dir={resumed}"])
    assert second.returncode == 0, second.stderr
    assert "resumed from" in (resumed / "launch.log").read_text()
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 7))
    assert_bit_identical_runs(resumed, straight)
