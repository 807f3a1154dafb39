"""`python launch.py` end to end, as a user runs it."""

import math

import torch
from safetensors.torch import load_file

from conftest import compose_config, read_metrics, run_launch
from distill.config import validate
from distill.run import build_trainer, train


def test_default_run_writes_run_folder(tmp_path):
    run = tmp_path / "run"
    result = run_launch(["training.max_steps=6", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "launch.log").read_text().count("step ") >= 6
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert math.isfinite(r["loss/critic"]) and r["step_time"] > 0
        assert {"grad_norm/critic", "lr/critic", "sigma/critic", "student_step"} <= set(r)
    generator_steps = [r for r in records if "loss/student" in r]
    assert [r["step"] for r in generator_steps] == [1, 6]  # iterations 0 and 5
    assert all(math.isfinite(r["loss/student"]) and "grad_norm/student" in r for r in generator_steps)
    assert sorted(p.name for p in (run / "export").iterdir()) == ["critic", "student"]
    assert (run / "export" / "student" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "checkpoint-6" / "trainer.json").is_file()


def test_run_loads_saved_model_through_from_pretrained(tmp_path, tiny_model_dir):
    """model.path: the same from_pretrained path a real Wan checkpoint takes."""
    config = validate(compose_config([f"model.path={tiny_model_dir}", "training.max_steps=1", "method.generator_lr=0.0001"]))
    trainer = train(config, tmp_path)
    saved = load_file(tmp_path / "export" / "student" / "transformer" / "diffusion_pytorch_model.safetensors")
    from diffusers import WanTransformer3DModel

    original = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").state_dict()
    assert saved.keys() == original.keys()
    # one generator step moved the student away from the loaded weights
    assert any(not torch.equal(saved[k], original[k]) for k in saved)
    teacher = trainer.roles["teacher"].module.state_dict()
    assert all(torch.equal(teacher[k], original[k]) for k in original)


def test_data_rollout_and_grad_accumulation_run(tmp_path):
    config = validate(
        compose_config(["method.rollout=data", "training.max_steps=2", "training.grad_accum_steps=2", "data.batch_size=1"])
    )
    train(config, tmp_path)
    assert len(read_metrics(tmp_path)) == 2


def test_finetune_lowers_flow_matching_loss_on_a_fixed_batch(tmp_path):
    overrides = ["method=finetune", "method.lr=1e-2", "method.condition_dropout=0.0", "roles.student.max_grad_norm=10"]
    overrides += ["data.num_samples=2", "data.batch_size=2", "training.max_steps=100"]
    trainer = build_trainer(validate(compose_config(overrides)), tmp_path)
    batch = next(iter(trainer.data))

    def held_out_loss():
        """Mean loss over 8 fixed draws of noise and sigma: the same before and after.

        Noise is seeded by the batch's sample ids, so fixed ids fix the draws."""
        losses = []
        with torch.no_grad():
            for k in range(8):
                ids = torch.tensor([10_000 + 2 * k, 10_001 + 2 * k])
                losses.append(trainer.method.step_losses(dict(batch, sample_id=ids), 0)[0]["student"].item())
        return sum(losses) / len(losses)

    before = held_out_loss()
    trainer.fit()
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)


def test_local_sweep_writes_one_folder_per_point(tmp_path):
    result = run_launch(["-m", "method.generator_lr=1e-6,2e-6", "training.max_steps=1", f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    for point, lr in (("0", 1e-6), ("1", 2e-6)):
        assert read_metrics(tmp_path / point)[0]["lr/student"] == lr
        assert (tmp_path / point / "export" / "student" / "transformer" / "config.json").is_file()


def fresh_python_prints(code: str) -> str:
    """What `code` prints in a new interpreter at the project root (it must exit 0)."""
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_launching_process_validates_and_spawns_without_loading_diffusers():
    """launch.py's own process composes, validates and hands the run to ranks or SLURM:
    diffusers (and the peft and transformers it pulls in, ~4 s a process) load only
    where a network is built."""
    code = ("import sys, launch, distill.run, distill.launcher, distill.export, distill.sample, distill.status\n"
            "from distill.registry import load_entries\n"
            "load_entries()\n"
            "print(sorted(m for m in ('diffusers', 'peft', 'transformers', 'accelerate') if m in sys.modules))")
    assert fresh_python_prints(code) == "[]"


def test_the_fork_servers_imports_ask_nothing_of_cuda():
    """Local ranks are forked from a fork server that imported RANK_IMPORTS. On a CUDA build a
    device query in that process (torch.cuda.is_available, device_count) initialises the
    driver and poisons the fork: every rank would then fail to use its GPU. So the imports
    must not query CUDA, which this checks on any build by counting the calls."""
    code = ("import importlib, torch.cuda as cuda\n"
            "calls = []\n"
            "for name in ('is_available', 'device_count', 'init', 'current_device', 'get_device_properties',\n"
            "             'get_device_capability', 'is_bf16_supported', 'mem_get_info', 'set_device'):\n"
            "    setattr(cuda, name, lambda *a, _n=name, _f=getattr(cuda, name), **k: calls.append(_n) or _f(*a, **k))\n"
            "from distill.launcher import RANK_IMPORTS\n"
            "for module in RANK_IMPORTS:\n"
            "    importlib.import_module(module)\n"
            "print(calls)")
    assert fresh_python_prints(code) == "[]"
