"""LTX-2 (model.family=ltx2): the joint audio-video sample, the pipeline's token
layouts, shift and text mask, and the two streams in the losses (per-stream DMD
normalisers, the audio weight and guidance), checked by hand on the tiny model
(DMD2 and finetuning on 1 and 2 ranks: tests/test_families.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from distill.config import validate
from distill.config.schema import RoleConfig
from distill.config.validate import ConfigError
from distill.roles import Role

TINY = ["model=ltx2_tiny"]


def tiny_adapter(overrides=()):
    from distill.models import build_adapter

    return build_adapter(validate(compose_config([*TINY, *overrides])).model)


def test_token_layouts_are_the_pipelines():
    from diffusers import LTX2Pipeline

    from distill.models.ltx2 import pack_audio, pack_video, unpack_audio, unpack_video

    video = torch.randn(2, 8, 3, 4, 6)
    tokens = pack_video(video)
    assert torch.equal(tokens, LTX2Pipeline._pack_latents(video))
    assert tokens[0, 1].tolist() == video[0, :, 0, 0, 1].tolist()  # token 1: frame 0, row 0, column 1, all channels
    assert torch.equal(unpack_video(tokens, 3, 4, 6), video)
    assert torch.equal(LTX2Pipeline._unpack_latents(tokens, 3, 4, 6), video)
    audio = torch.randn(2, 2, 5, 4)
    assert torch.equal(pack_audio(audio), LTX2Pipeline._pack_audio_latents(audio))
    assert torch.equal(unpack_audio(pack_audio(audio), 4), audio)


def test_a_sample_is_both_streams_side_by_side():
    adapter = tiny_adapter()
    assert adapter.latent_shape == (8 * 3 * 4 * 4 + 2 * 5 * 4,)
    x = torch.arange(2 * 424, dtype=torch.float32).reshape(2, 424)
    parts = adapter.streams(x)
    assert parts["video"].shape == (2, 8, 3, 4, 4) and parts["audio"].shape == (2, 2, 5, 4)
    assert parts["audio"][1, 0, 0, 0].item() == 424 + 384  # the audio starts after the 384 video values
    assert torch.equal(adapter.join_streams(parts), x)


def test_the_shift_is_the_pipelines_for_the_video_size():
    """512x768, 121 frames -> [128, 16, 16, 24]: 6,144 video tokens, mu = 0.95 + 1.1 * 5120 / 3072
    (LTX2Pipeline's calculate_shift with its defaults, extrapolated past 4,096 as it does)."""
    from distill.models.ltx2 import LTX2Adapter, LTX2Config

    adapter = LTX2Adapter(LTX2Config())
    assert adapter.shift == pytest.approx(math.exp(0.95 + 1.1 * 5120 / 3072)) == pytest.approx(16.17, abs=0.01)
    assert adapter.latent_shape == (128 * 16 * 16 * 24 + 8 * 126 * 16,)


def test_padded_text_attends_as_the_pipeline_does():
    """The data pads the connectors' embeddings with zeros: the adapter's mask keeps the
    prompt's tokens, so the prediction equals the transformer's on the unpadded prompt."""
    from distill.models.ltx2 import pack_audio, pack_video, unpack_audio, unpack_video

    adapter = tiny_adapter()
    net = adapter.load(None, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 424, generator=g)
    video_text, audio_text = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    padded = torch.cat([torch.cat([video_text, audio_text], dim=-1), torch.zeros(1, 3, 32)], dim=1)
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        v = adapter.predict_velocity(Role("r", RoleConfig(), net), x, sigma, padded)
        parts = adapter.streams(x)
        want_video, want_audio = net(
            hidden_states=pack_video(parts["video"]), audio_hidden_states=pack_audio(parts["audio"]),
            encoder_hidden_states=video_text, audio_encoder_hidden_states=audio_text, timestep=1000 * sigma,
            sigma=1000 * sigma, num_frames=3, height=4, width=4, fps=24.0, audio_num_frames=5, return_dict=False)
    got = adapter.streams(v)
    assert torch.allclose(got["video"], unpack_video(want_video, 3, 4, 4), atol=1e-5)
    assert torch.allclose(got["audio"], unpack_audio(want_audio, 4), atol=1e-5)


def test_a_difference_in_the_audio_moves_only_the_audio_dmd_gradient():
    """fake and real agree on the video and differ on the audio: the DMD gradient's video part is
    zero and its audio part is (fake - real) / mean|x0 - real| over the audio alone."""
    from distill.methods.dmd2 import dmd_gradient
    from distill.methods.streams import stream_map

    adapter = tiny_adapter()
    g = torch.Generator().manual_seed(1)
    x0, real = torch.randn(2, 424, generator=g), torch.randn(2, 424, generator=g)
    fake = real.clone()
    fake[:, 384:] += 0.5
    grad = adapter.streams(stream_map(adapter, dmd_gradient, x0, fake, real))
    assert torch.count_nonzero(grad["video"]) == 0
    audio_x0, audio_real = adapter.streams(x0)["audio"], adapter.streams(real)["audio"]
    want = 0.5 / (audio_x0 - audio_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad["audio"], want.expand_as(grad["audio"]))
    # the whole tensor's normaliser (one stream) would have mixed the video into the audio's scale
    assert not torch.allclose(grad["audio"], adapter.streams(dmd_gradient(x0, fake, real))["audio"])


def test_losses_weigh_each_streams_mean_and_guidance_is_per_stream():
    """stream_loss = mse(video) + audio_weight * mse(audio), each a mean of its own; the teacher's
    CFG uses the method's scale on the video and model.audio_guidance_scale on the audio."""
    from distill.methods.streams import stream_loss

    adapter = tiny_adapter(["model.audio_weight=0.25", "model.audio_guidance_scale=7.0"])
    pred, target = torch.zeros(1, 424), torch.zeros(1, 424)
    target[:, :384], target[:, 384:] = 1.0, 2.0
    assert stream_loss(adapter, F.mse_loss, pred, target).item() == pytest.approx(1.0 + 0.25 * 4.0)

    class TextEcho(torch.nn.Module):  # velocity: the prompt's mean everywhere (cond 1, uncond 0)
        def forward(self, x_t, timestep, text):
            return text.mean(dim=(1, 2)).reshape(-1, 1).expand_as(x_t)

    adapter.forward = lambda module, x_t, timestep, text, **cond: module(x_t, timestep, text)
    x0 = adapter.predict_x0_cfg(Role("r", RoleConfig(), TextEcho()), torch.zeros(1, 424), torch.tensor([0.5]),
                                torch.ones(1, 2, 32), torch.zeros(1, 2, 32), 3.0)
    # x0 = x_t - sigma * v with v = 0 + scale * (1 - 0): -0.5 * 3 on the video, -0.5 * 7 on the audio
    assert x0[0, :384].unique().tolist() == [-1.5] and x0[0, 384:].unique().tolist() == [-3.5]


def test_wrong_shapes_and_causal_roles_are_refused():
    cases = {
        "model.audio_shape=[2,5]": "model.audio_shape=[2, 5]: the audio latent, [channels, frames, mel bins]",
        "model.audio_shape=[2,5,8]": "audio_in_channels=8 of model.arch does not fit model.audio_shape=[2, 5, 8]",
        "model.text_dim=30": "model.text_dim=30 does not match caption_channels=16 of model.arch",
        "model.latents_mean=[0,0,0,0,0,0,0,0]": "model.latents_mean: model.family=ltx2 keeps its joint samples",
        "roles.student.causal=true": "model.family=ltx2 has no block-causal variant",
        "parallel.context=2": "parallel.context=2: model.family=ltx2 has no context parallelism (allowed: 1): "
                              "diffusers 0.42.1 declares a plan",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            validate(compose_config([*TINY, override, *(["launcher.nproc_per_node=2"] if "context" in override else [])]))
        assert message in str(err.value), override
