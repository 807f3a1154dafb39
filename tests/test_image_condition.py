"""First-frame image-to-video conditioning (model.image_condition=first_frame):
hand-computed velocities, the network's inputs against diffusers' Wan pipeline
(expand_timesteps), and the first frame held through every sampler."""

import pytest
import torch
from torch import nn

from distill.config.schema import RoleConfig
from distill.models.wan_config import ImageCondition, WanConfig
from distill.roles import Role
from distill.sampling import EulerSampler, FewStepSampler
from standins import StandInWan


class Affine(nn.Module):
    """velocity = a * x_t + 1: outputs known by hand."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))

    def forward(self, x_t, timestep, text):
        return self.a * x_t + 1.0


def stand_in(frames=2):
    return StandInWan(WanConfig(latent_shape=[1, frames, 1, 1], image_condition=ImageCondition.first_frame))


def test_first_frame_velocity_takes_x_t_to_the_image():
    a = stand_in()
    role = Role("r", RoleConfig(), Affine(0.5))
    x_t = torch.tensor([4.0, 6.0]).reshape(1, 1, 2, 1, 1)  # frames 0 and 1
    image = torch.full((1, 1, 1, 1, 1), 3.0)
    sigma = torch.tensor([0.25])
    v = a.predict_velocity(role, x_t, sigma, torch.zeros(1, 2, 2), first_frame=image)
    # frame 0: (4 - 3) / 0.25 = 4 ; frame 1: the network's 0.5 * 6 + 1 = 4
    assert torch.allclose(v.flatten(), torch.tensor([4.0, 4.0]))
    x0 = a.predict_x0(role, x_t, sigma, torch.zeros(1, 2, 2), first_frame=image)
    # frame 0: 4 - 0.25 * 4 = 3, the image ; frame 1: 6 - 0.25 * 4 = 5
    assert torch.allclose(x0.flatten(), torch.tensor([3.0, 5.0]))
    # a flow-matching target built from a clip whose first frame is the image is met there exactly
    noise = torch.tensor([2.0, -1.0]).reshape(1, 1, 2, 1, 1)
    clip = torch.tensor([3.0, 0.0]).reshape(1, 1, 2, 1, 1)
    x_t = a.add_noise(clip, noise, sigma)
    v = a.predict_velocity(role, x_t, sigma, torch.zeros(1, 2, 2), first_frame=image)
    assert torch.allclose(v[:, :, 0], a.velocity_target(clip, noise)[:, :, 0])


@pytest.mark.parametrize("sampler", [FewStepSampler([1.0, 0.75, 0.5]), EulerSampler([1.0, 0.6, 0.2], 3.0)])
def test_samplers_hold_the_first_frame(sampler):
    a = stand_in(frames=3)
    role = Role("r", RoleConfig(), Affine(-0.7))
    image = torch.tensor([1.5, -2.0]).reshape(2, 1, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = sampler(a, role, torch.zeros(2, 2, 2), torch.ones(2, 2, 2),
                  lambda shape: torch.randn(shape, generator=g), first_frame=image)
    assert torch.allclose(out[:, :, :1], image, atol=1e-5)
    assert not torch.allclose(out[:, :, 1:], image.expand(-1, -1, 2, -1, -1), atol=1e-2)  # the rest is generated


def tiny_ti2v():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=48,
                                 out_channels=48, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def test_wan_forward_gives_the_network_what_diffusers_ti2v_pipeline_gives_it():
    """diffusers' WanImageToVideoPipeline with expand_timesteps (Wan2.2-TI2V-5B):
    latent_model_input = (1 - mask) * condition + mask * latents, and a timestep per
    token, mask * t, with mask 0 on the first latent frame."""
    from distill.models.wan import WanAdapter

    module = tiny_ti2v()
    adapter = WanAdapter(WanConfig(latent_shape=[48, 3, 4, 4], text_dim=16, text_len=4,
                                     image_condition=ImageCondition.first_frame))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn((2, 48, 3, 4, 4), generator=g)
    condition = torch.randn((2, 48, 1, 4, 4), generator=g)
    text = torch.randn((2, 4, 16), generator=g)
    t = torch.tensor(700.0)
    mask = torch.ones(1, 1, 3, 4, 4)
    mask[:, :, 0] = 0
    with torch.no_grad():
        want = module(hidden_states=(1 - mask) * condition + mask * latents,
                      timestep=(mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(2, -1),
                      encoder_hidden_states=text, return_dict=False)[0]
        got = adapter.forward(module, latents, t.expand(2), text, first_frame=condition)
        plain = adapter.forward(module, latents, t.expand(2), text)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(plain, want, atol=1e-3)  # the conditioning changes what the network sees


def refusal(overrides):
    from conftest import compose_config
    from distill.config import validate
    from distill.config.validate import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    return str(err.value)


def test_image_conditioning_refusals_name_the_key():
    assert ("model.image_condition=concat: model.arch has no image projection (image_dim is null)"
            in refusal(["model.image_condition=concat"]))
    assert "in_channels=16 of model.arch does not fit" in refusal(["model.image_condition=concat",
                                                                    "+model.arch.image_dim=8"])
    assert ("roles.student.causal=true with model.image_condition=first_frame: the block-causal Wan is text-to-video"
            in refusal(["model.image_condition=first_frame", "roles.student.causal=true", "model.chunk_frames=1"]))
    assert "the video needs latent frames after the image's" in refusal(["model.image_condition=first_frame",
                                                                          "model.latent_shape=[16,1,16,16]"])


def test_synthetic_data_has_no_image_embeddings_for_concat():
    from conftest import compose_config
    from distill.config import validate
    from distill.data import DataError, build_data

    config = validate(compose_config(["model.image_condition=concat", "+model.arch.image_dim=8",
                                      "model.arch.in_channels=36"]))
    with pytest.raises(DataError, match="data=synthetic has no image embeddings for model.image_condition=concat"):
        build_data(config)
    first = validate(compose_config(["model.image_condition=first_frame"]))
    batch = next(build_data(first))
    assert torch.equal(batch["first_frame"], batch["latents"][:, :, :1])


@pytest.mark.multiprocess
def test_first_frame_conditioning_under_context_parallelism_equals_one_rank(tmp_path):
    """The image's tokens run at timestep 0: a per-token timestep that diffusers' plan
    splits over the context group with the tokens."""
    from conftest import assert_runs_match, read_metrics, run_launch, train_here

    common = ["training.max_steps=3", "method.generator_update_interval=2", "model.image_condition=first_frame",
              "data.batch_size=2"]
    train_here([*common, f"hydra.run.dir={tmp_path / 'one'}"])
    result = run_launch([*common, "launcher.nproc_per_node=2", "parallel.context=2", f"hydra.run.dir={tmp_path / 'cp2'}"])
    assert result.returncode == 0, result.stderr
    assert len(read_metrics(tmp_path / "one")) == 3
    assert_runs_match(tmp_path / "cp2", tmp_path / "one", roles=(), abs_tol=1e-12)  # pytest.approx's own
