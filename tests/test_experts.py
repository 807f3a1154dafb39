"""Two experts by noise level (model.boundary_ratio, Wan2.2 A14B): routing against a
hand-computed boundary, per-expert guidance, and a tiny pair end to end: the real
folder layout (transformer/, transformer_2/) loaded through the real path, DMD2 on
1 and 2 ranks, resume, one expert trained, and the export in diffusers' WanPipeline."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import (assert_bit_identical_runs, assert_runs_match, compose_config, exported_weights, read_metrics,
                      run_launch)
from distill.config.schema import RoleConfig
from distill.models.wan_config import WanConfig
from distill.models.experts import ExpertPair
from distill.roles import Role
from standins import StandInWan

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, rope_max_seq_len=32)


class Constant(nn.Module):
    """Outputs `value` everywhere and counts the samples it saw."""

    def __init__(self, value):
        super().__init__()
        self.value, self.seen = value, []
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        self.seen.append(hidden_states.shape[0])
        return (self.weight * torch.full_like(hidden_states, self.value),)


def test_each_sample_goes_to_the_expert_of_its_timestep():
    pair = ExpertPair(Constant(1.0), Constant(2.0), boundary_timestep=875.0)
    x = torch.zeros(4, 1, 2, 1, 1)
    t = torch.tensor([999.0, 875.0, 874.9, 100.0])  # the boundary itself is the high expert's, as in the pipeline
    out = pair(x, t, torch.zeros(4, 3, 2))[0]
    assert out[:, 0, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert pair.high.seen == [2] and pair.low.seen == [2]
    # per-token timesteps (an image's tokens at 0) route by the sample's largest
    assert pair.route(torch.tensor([[0.0, 900.0], [0.0, 500.0]])).tolist() == [True, False]
    # one expert only: the other does not run
    pair(x, torch.full((4,), 950.0), torch.zeros(4, 3, 2))
    assert pair.high.seen == [2, 4] and pair.low.seen == [2]


def test_cfg_uses_each_experts_scale():
    adapter = StandInWan(WanConfig(latent_shape=[1, 1, 1, 1], boundary_ratio=0.5, low_noise_guidance_scale=2.0))

    class TextEcho(nn.Module):  # velocity = the text's mean: cond 1, uncond 0
        def forward(self, x_t, timestep, text):
            return text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1).expand_as(x_t)

    role = Role("r", RoleConfig(), TextEcho())
    sigma = torch.tensor([0.8, 0.3])
    x0 = adapter.predict_x0_cfg(role, torch.zeros(2, 1, 1, 1, 1), sigma, torch.ones(2, 2, 2), torch.zeros(2, 2, 2), 5.0)
    # x0 = -sigma * v; uncond v = 0, cond v = 1: x0 = -sigma * scale, scale 5 above t = 500, 2 below
    assert torch.allclose(x0.flatten(), torch.tensor([-0.8 * 5.0, -0.3 * 2.0]))


@pytest.fixture(scope="session")
def pair_folder(built_once):
    """A tiny two-expert (A14B-style) model folder, shared by every worker."""
    from diffusers import WanTransformer3DModel

    def make(folder):
        for seed, sub in enumerate(("transformer", "transformer_2")):
            torch.manual_seed(seed)
            WanTransformer3DModel(**TINY).save_pretrained(folder / sub)

    return built_once("tiny-a14b", make)


def common(folder):
    return [f"model.path={folder}", "model.boundary_ratio=0.9", "model.low_noise_guidance_scale=2.0",
            "method.generator_update_interval=2", "roles.student.ema_decay=0.9"]


@pytest.fixture(scope="session")
def one_rank(pair_folder, built_once):
    def make(folder):
        # launched: the resume test compares a launched run with it bit for bit
        result = run_launch([*common(pair_folder), "data.batch_size=2", "training.max_steps=4", f"hydra.run.dir={folder}"])
        assert result.returncode == 0, result.stderr

    return built_once("a14b-one-rank", make)


@pytest.mark.multiprocess
def test_two_ranks_equal_one_rank_and_both_experts_train(pair_folder, one_rank, tmp_path):
    run = tmp_path / "two"
    result = run_launch([*common(pair_folder), "data.batch_size=1", "launcher.nproc_per_node=2",
                         "training.max_steps=4", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    assert len(read_metrics(run)) == 4
    assert_runs_match(run, one_rank, subfolders=("transformer", "transformer_2"))
    # the critic's flow-matching timesteps are drawn per sample, across the boundary: both experts learn
    for sub in ("transformer", "transformer_2"):
        original = load_file(pair_folder / sub / "diffusion_pytorch_model.safetensors")
        trained = exported_weights(one_rank, "critic", sub)
        assert any(not torch.equal(trained[k], original[k]) for k in original), sub


def test_resume_is_bit_identical(pair_folder, one_rank, tmp_path):
    run = tmp_path / "resumed"
    args = [*common(pair_folder), "data.batch_size=2", f"hydra.run.dir={run}"]
    assert run_launch([*args, "training.max_steps=2"]).returncode == 0
    second = run_launch([*args, "training.max_steps=4"])
    assert second.returncode == 0, second.stderr
    assert_bit_identical_runs(run, one_rank)


def test_one_trained_expert_leaves_the_other_as_loaded_and_unsaved(pair_folder, tmp_path):
    run = tmp_path / "low_only"
    result = run_launch([*common(pair_folder), "model.trained_experts=[low]", "training.max_steps=2",
                         f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    high, low = exported_weights(run, "student", "transformer"), exported_weights(run, "student", "transformer_2")
    high_0 = load_file(pair_folder / "transformer" / "diffusion_pytorch_model.safetensors")
    low_0 = load_file(pair_folder / "transformer_2" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(high[k], high_0[k]) for k in high_0)
    assert any(not torch.equal(low[k], low_0[k]) for k in low_0)
    from safetensors import safe_open

    keys = []
    for shard in sorted(run.glob("checkpoint-*"))[-1].glob("state/*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys += list(f.keys())
    for role in ("student", "critic"):  # model.trained_experts holds for every trainable role
        saved = [k for k in keys if k.startswith(f"role.{role}/model/")]
        assert saved and all(k.startswith(f"role.{role}/model/low.") for k in saved), saved[:3]


def test_export_loads_into_wan_pipeline_with_both_experts(pair_folder, one_rank):
    """WanPipeline(transformer, transformer_2, boundary_ratio) from the export: the
    pipeline's expert at each timestep gives what the trained pair gives."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from distill.checkpoint import read_complete
    from distill.config.io import load_config
    from distill.export import trained_module
    from distill.models import build_adapter

    folder = one_rank / "export" / "student"
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=WanTransformer3DModel.from_pretrained(folder, subfolder="transformer"),
                       transformer_2=WanTransformer3DModel.from_pretrained(folder, subfolder="transformer_2"),
                       boundary_ratio=0.9)
    config = load_config(one_rank / "config.yaml")
    adapter = build_adapter(config.model)
    student = trained_module(read_complete(one_rank), config, adapter, "student")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *config.model.latent_shape), generator=g)
    text = torch.randn((2, config.model.text_len, config.model.text_dim), generator=g)
    boundary = pipe.config.boundary_ratio * 1000
    for t in (950.0, 400.0):
        expert = pipe.transformer if t >= boundary else pipe.transformer_2
        with torch.no_grad():
            want = expert(x, torch.full((2,), t), text, return_dict=False)[0]
            got = adapter.forward(student, x, torch.full((2,), t), text)
        assert torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():  # a batch across the boundary: each sample its expert's
        mixed = adapter.forward(student, x, torch.tensor([950.0, 400.0]), text)
        high = pipe.transformer(x[:1], torch.tensor([950.0]), text[:1], return_dict=False)[0]
        low = pipe.transformer_2(x[1:], torch.tensor([400.0]), text[1:], return_dict=False)[0]
    assert torch.allclose(mixed, torch.cat([high, low]), atol=1e-5)


def test_expert_refusals_name_the_key(pair_folder):
    from distill.config import validate
    from distill.config.validate import ConfigError

    def error(overrides):
        with pytest.raises(ConfigError) as err:
            validate(compose_config(overrides))
        return str(err.value)

    assert "model.boundary_ratio=1.5: must be in (0, 1)" in error([*common(pair_folder), "model.boundary_ratio=1.5"])
    assert "model.trained_experts=['mid']: one or both of high, low" in error(
        [*common(pair_folder), "model.trained_experts=[mid]"])
    assert "method.gan.enabled=true with model.boundary_ratio" in error([*common(pair_folder), "method.gan.enabled=true"])
    assert "roles.student.lora.rank=4 with model.boundary_ratio" in error(
        [*common(pair_folder), "roles.student.lora.rank=4"])
    assert "model.low_noise_guidance_scale=3.0 needs two experts" in error(["model.low_noise_guidance_scale=3.0"])
    single = pair_folder.parent / "single"
    (single / "transformer").mkdir(parents=True, exist_ok=True)
    for name in ("config.json",):
        (single / "transformer" / name).write_text((pair_folder / "transformer" / name).read_text())
    assert "transformer_2" in error([f"model.path={single}", "model.boundary_ratio=0.9"])
