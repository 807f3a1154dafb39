"""Self-Forcing DMD on the tiny causal Wan: the gradient flows only through each
chunk's exit step, 2 ranks equal 1, resume is bit-exact, the export carries
its chunking and samples chunk by chunk."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_bit_identical_runs, ROOT, compose_config, read_metrics, run_launch
from distill.config import validate
from distill.distributed import Runtime
from distill.methods import build_method
from distill.models import build_adapter
from distill.roles import build_roles
from distill.sampling import CausalSampler

SF = ["experiment=tiny", "method=self_forcing", "method.generator_update_interval=2"]


def weights(run, role):
    return load_file(run / "export" / role / "transformer" / "diffusion_pytorch_model.safetensors")


def test_gradient_flows_only_through_each_chunks_exit_step():
    config = validate(compose_config([*SF, "method.student_steps=[1000,750,500,250]"]))
    adapter = build_adapter(config.model)
    roles = build_roles(config, adapter, Runtime())
    method = build_method(config, adapter, roles, "cpu")
    calls = []
    forward = adapter.predict_x0

    def spy(role, x, sigma, text, **cond):
        state = role.module.causal_state
        calls.append((state.cache.frame_offset, state.cache.write, round(float(sigma[0]), 4), torch.is_grad_enabled()))
        return forward(role, x, sigma, text, **cond)

    adapter.predict_x0 = spy
    method.exit_steps = lambda chunks: [2, 0, 3]  # chunks of 1 latent frame: 3 chunks
    batch = {"text_embeds": torch.randn(2, 8, 32), "sample_id": torch.tensor([0, 1])}
    method.noise.start([0, 1])
    x0 = method.student_sample(batch, {}, metrics := {})
    sigmas = [round(s, 4) for s in method.student_sigmas.tolist()]
    assert calls == [
        (0, False, sigmas[0], False), (0, False, sigmas[1], False), (0, False, sigmas[2], True),  # chunk 0 exits at 2
        (0, True, 0.0, False),  # written to the cache, clean, without gradient
        (1, False, sigmas[0], True),  # chunk 1 exits at once
        (1, True, 0.0, False),
        (2, False, sigmas[0], False), (2, False, sigmas[1], False), (2, False, sigmas[2], False),
        (2, False, sigmas[3], True),  # the last chunk is not written
    ]
    assert metrics["student_step"] == 5 / 3 and x0.shape == (2, 16, 3, 16, 16) and x0.requires_grad
    x0.square().sum().backward()
    assert all(p.grad is not None for p in roles["student"].module.parameters())


@pytest.mark.multiprocess
def test_two_ranks_equal_one_and_resume_is_bit_exact(tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    common = [*SF, "roles.student.ema_decay=0.9"]
    assert run_launch([*common, "data.batch_size=2", "training.max_steps=4", f"hydra.run.dir={one}"]).returncode == 0
    r2 = run_launch([*common, "data.batch_size=1", "launcher.nproc_per_node=2", "training.max_steps=4",
                     f"hydra.run.dir={two}"])
    assert r2.returncode == 0, r2.stderr
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in x:
            if key.startswith(("loss/", "grad_norm/")):
                assert abs(x[key] - y[key]) <= 1e-5 * abs(x[key]), (x["step"], key)
    for role in ("student", "critic"):
        w1, w2 = weights(one, role), weights(two, role)
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5
    # resume: 2 steps, then a second launch to 4, equals the straight 1-rank run bit for bit
    assert run_launch([*common, "data.batch_size=2", "training.max_steps=2", f"hydra.run.dir={resumed}"]).returncode == 0
    assert run_launch([*common, "data.batch_size=2", "training.max_steps=4", f"hydra.run.dir={resumed}"]).returncode == 0
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    assert "resumed from" in (resumed / "launch.log").read_text()
    assert_bit_identical_runs(one, resumed)
    # the export: diffusers layout, chunking and sigmas in distill.json, sampled chunk by chunk
    export = one / "export" / "student"
    scheduler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    info = json.loads((export / "distill.json").read_text())
    assert scheduler["stochastic_sampling"] and len(info["sampler"]["sigmas"]) == 3
    assert info["sampler"]["kind"] == "causal_few_step" and info["chunk_frames"] == 1
    from distill.sample import load_exported

    adapter, role, sampler = load_exported(export)
    assert isinstance(sampler, CausalSampler) and hasattr(role.module, "causal_state")
    out = subprocess.run([sys.executable, "-m", "distill.sample", str(export), "--prompt", "a red fox", "--out",
                          str(tmp_path / "fox.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert load_file(tmp_path / "fox.safetensors")["samples"].shape[2] == 3


def test_activation_checkpointing_recomputes_over_the_cache_each_chunk_saw():
    """The backward runs after the whole rollout; a checkpointed block must see the
    cache as its forward did: gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        config = validate(compose_config([*SF, f"roles.student.activation_checkpointing={'full' if checkpointing else 'none'}"]))
        adapter = build_adapter(config.model)
        roles = build_roles(config, adapter, Runtime())
        method = build_method(config, adapter, roles, "cpu")
        method.exit_steps = lambda chunks: [1, 0, 2]
        method.noise.start([0, 1])
        x0 = method.student_sample({"text_embeds": torch.ones(2, 8, 32)}, {}, {})
        x0.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in roles["student"].module.named_parameters()})
    assert roles["student"].module.gradient_checkpointing
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
