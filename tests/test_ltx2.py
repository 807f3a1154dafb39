"""LTX-2 (model.family=ltx2): the joint audio-video sample, the pipeline's token
layouts, shift and text mask, and the two streams in the losses (per-stream DMD
normalisers, the audio weight and guidance), checked by hand on the tiny model;
the log-mel spectrogram by hand; clips with sound preprocessed through a tiny
LTX-2 folder (both VAEs, Gemma-3, the text connectors), a student distilled on
them for text-to-video and for image-to-video, and each export sampled by the
stock LTX2Pipeline / LTX2ImageToVideoPipeline as our sampler samples it (DMD2 and
finetuning on 1 and 2 ranks: tests/test_families.py)."""

import json
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
        "model.image_condition=concat": "model.image_condition=concat: model.family=ltx2 conditions on an image "
                                        "as LTX2ImageToVideoPipeline does (first_frame)",
        "model.latent_shape=[8,1,4,4]": "the image is the first latent frame, so the video needs at least 2",
        "model.stg_scale=1": "model.stg_blocks=[29]: model.arch has blocks 0-1",
        "parallel.context=2": "parallel.context=2: model.family=ltx2 has no context parallelism (allowed: 1): "
                              "diffusers 0.42.1 declares a plan",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            extra = {"context": ["launcher.nproc_per_node=2"], "[8,1,4,4]": ["model.image_condition=first_frame"]}
            validate(compose_config([*TINY, override, *next((v for k, v in extra.items() if k in override), [])]))
        assert message in str(err.value), override


def test_the_log_mel_spectrogram_by_hand():
    """16 kHz stereo, hop 160, 16 Slaney mel bins over 0-8 kHz: samples // hop + 1 frames;
    silence is the log floor, ln(1e-5), in every bin; a 1 kHz sine peaks in bin 5 (Slaney
    mels are 3 f / 200 below 1 kHz: 1 kHz is mel 15; the 18 band edges are 0 to mel(8 kHz)
    = 45.245 in steps of 2.661, so bin 5 spans 13.31-18.63 with its peak at 15.97, bin 4
    10.65-15.97) and bin 4 is next; bins above 6 hold nothing of it."""
    from distill.models.ltx2_encoders import log_mel

    t = torch.arange(3333) / 16000
    tone = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    mel = log_mel(torch.stack([torch.zeros_like(t), tone])[None], 16000, 160, 16)
    assert mel.shape == (1, 2, 3333 // 160 + 1, 16)
    assert torch.allclose(mel[0, 0], torch.full_like(mel[0, 0], math.log(1e-5)))
    frame = mel[0, 1, 10]
    assert frame.argmax() == 5 and frame.topk(2).indices.tolist() == [5, 4]
    assert torch.all(frame[7:] == math.log(1e-5))


def write_clips(folder):
    """Five sounding clips of 6 frames (1 kHz or 440 Hz), one without sound, one too short."""
    from conftest import write_sounding_clip

    folder.mkdir()
    rows = []
    for i in range(5):
        write_sounding_clip(folder / f"clip{i}.mkv", frames=6, tone=1000 if i % 2 else 440, seed=i)
        rows.append({"file_name": f"clip{i}.mkv", "caption": "a red square moves left" if i % 2 else "a blue square"})
    write_sounding_clip(folder / "silent.mkv", frames=6)
    write_sounding_clip(folder / "short.mkv", frames=3, tone=440)
    rows += [{"file_name": "silent.mkv", "caption": "a square"}, {"file_name": "short.mkv", "caption": "a square"}]
    captions = folder.parent / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in rows))
    return captions


@pytest.fixture(scope="module")
def ltx2_export(tmp_path_factory):
    """A tiny LTX-2 pipeline folder; clips with sound + captions preprocessed through its
    VAEs, Gemma-3 and text connectors into a parquet dataset; a 2-step student distilled on
    it (rolled out from the data) with the deterministic sampler, and exported."""
    from conftest import write_tiny_family, write_tiny_ltx2_parts
    from distill.preprocess import main as preprocess
    from distill.run import train

    root = tmp_path_factory.mktemp("ltx2")
    base = write_tiny_family(root / "model", "ltx2_tiny", write_tiny_ltx2_parts)
    captions = write_clips(root / "clips")
    # no --family: the folder's LTX2VideoTransformer3DModel names it
    assert preprocess(["--model", str(base), "--captions", str(captions), "--videos", str(root / "clips"),
                       "--out", str(root / "data"), "--frames", "5", "--height", "32", "--width", "32", "--fps", "24",
                       "--max-text-len", "8", "--batch-size", "2"]) == 0
    config = validate(compose_config([
        *TINY, f"model.path={base}", "model.vae=ltx2", "model.text_encoder=family", "data=parquet",
        f"data.path={root / 'data'}", "method.student_steps=[1000,500]", "method.student_sampler=deterministic",
        "method.rollout=data", "training.max_steps=2", "validation.num_samples=1",
        "validation.health.diversity_seeds=0"]))
    train(config, root / "run")
    return root / "run" / "export" / "student", root


def test_clips_preprocess_into_joint_audio_video_samples(ltx2_export):
    """Each row: the video latent [8, 3, 4, 4] and the audio latent [2, 5, 4] (5 frames at 24 fps
    are 0.208 s: 5 audio latent frames at 25 a second) side by side, 424 numbers; the text is the
    connectors' video and audio tokens [8, 32]; the clip without sound and the short one are
    skipped; the two tones give different audio latents over the same video VAE."""
    import pyarrow.parquet as pq

    from distill.data.schema import decode

    _, root = ltx2_export
    table = pq.read_table(list((root / "data").glob("*.parquet"))).to_pylist()
    rows = {row["id"]: row for row in table}
    assert sorted(rows) == [f"clip{i}.mkv" for i in range(5)]
    assert all(row["vae_latent_shape"] == [8 * 3 * 4 * 4 + 2 * 5 * 4] for row in table)
    assert all(row["text_embedding_shape"] == [8, 32] for row in table)
    latent = {k: decode(r["vae_latent_bytes"], r["vae_latent_shape"], r["vae_latent_dtype"]) for k, r in rows.items()}
    audio = {k: v[8 * 3 * 4 * 4:] for k, v in latent.items()}
    assert torch.allclose(audio["clip1.mkv"], audio["clip3.mkv"], atol=1e-5)  # both 1 kHz
    assert not torch.allclose(audio["clip0.mkv"], audio["clip1.mkv"], atol=1e-3)  # 440 Hz against 1 kHz


def test_the_stock_pipeline_samples_the_exported_student(ltx2_export):
    """LTX2Pipeline.from_pretrained(export), given the noise `python -m distill.sample` draws for
    seed 3 and the model card's call (guidance 1 for both streams, the pipeline's STG, modality
    guidance and rescale off), runs the student once a step at its sigmas and gives the video and
    audio latents it gives."""
    from diffusers import LTX2Pipeline
    from safetensors.torch import load_file

    from distill.models.ltx2 import pack_audio, pack_video, unpack_audio
    from distill.sample import load_exported, main

    export, root = ltx2_export
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline"
    assert {part for part, entry in index.items() if entry != [None, None]} >= {
        "tokenizer", "text_encoder", "connectors", "vae", "audio_vae", "vocoder", "transformer", "scheduler"}
    card = (export / "README.md").read_text()
    call = ("guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, "
            "audio_modality_scale=1.0, guidance_rescale=0.0, audio_guidance_rescale=0.0, use_cross_timestep=False, "
            "frame_rate=24.0")
    assert call in card and ".to_tuple()" in card
    info = json.loads((export / "distill.json").read_text())
    out = root / "ours.safetensors"
    assert main([str(export), "--prompt", "a red square moves left", "--seeds", "3", "--out", str(out)]) == 0
    ours = load_file(out)["samples"]
    adapter, _, _ = load_exported(export)
    noise = adapter.streams(torch.randn((1, *adapter.latent_shape), generator=torch.Generator().manual_seed(3)))

    pipe = LTX2Pipeline.from_pretrained(export)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"][0].item()), with_kwargs=True)
    audio_vae = pipe.audio_vae
    # the pipeline normalises given audio latents by the audio VAE's statistics (on packed tokens)
    audio_noise = unpack_audio(pack_audio(noise["audio"]) * audio_vae.latents_std + audio_vae.latents_mean, 4)
    kwargs = eval(f"dict({call})")  # the card's call
    video, audio = pipe("a red square moves left", num_frames=5, height=32, width=32, num_inference_steps=2,
                        max_sequence_length=8, latents=pack_video(noise["video"]), audio_latents=audio_noise,
                        output_type="latent", return_dict=False, **kwargs)
    assert seen == pytest.approx([1000 * s for s in info["sampler"]["sigmas"]], abs=1e-3)
    vae = pipe.vae
    ours = adapter.streams(ours)
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    assert torch.allclose(video, ours["video"] * std / vae.config.scaling_factor + mean, atol=1e-5)
    expected = unpack_audio(pack_audio(ours["audio"]) * audio_vae.latents_std + audio_vae.latents_mean, 4)
    assert torch.allclose(audio, expected, atol=1e-5)


@pytest.fixture(scope="module")
def ltx2_i2v(ltx2_export):
    """The same clips preprocessed for image-to-video (`--task i2v`), a 2-step first-frame
    student distilled on them (rolled out from the data, deterministic), and exported."""
    from distill.preprocess import main as preprocess
    from distill.run import train

    _, root = ltx2_export
    assert preprocess(["--task", "i2v", "--model", str(root / "model"), "--captions", str(root / "captions.jsonl"),
                       "--videos", str(root / "clips"), "--out", str(root / "data_i2v"), "--frames", "5", "--height",
                       "32", "--width", "32", "--fps", "24", "--max-text-len", "8", "--batch-size", "2"]) == 0
    config = validate(compose_config([
        *TINY, f"model.path={root / 'model'}", "model.vae=ltx2", "model.text_encoder=family",
        "model.image_condition=first_frame", "data=parquet", f"data.path={root / 'data_i2v'}",
        "method.student_steps=[1000,500]", "method.student_sampler=deterministic", "method.rollout=data",
        "training.max_steps=2", "validation.num_samples=1", "validation.health.diversity_seeds=0"]))
    train(config, root / "run_i2v")
    return root / "run_i2v", root


def test_i2v_rows_hold_the_image_latent_the_clip_starts_with(ltx2_i2v):
    """`--task i2v`: first_frame_latent is the first frame encoded alone [8, 1, 4, 4] (the
    image-to-video pipeline's encoding), equal to the first latent frame of the clip's joint
    sample (the causal VAE); pil_image the frame's pixels; no image-encoder features."""
    import pyarrow.parquet as pq

    from distill.data.schema import decode

    _, root = ltx2_i2v
    for row in pq.read_table(list((root / "data_i2v").glob("*.parquet"))).to_pylist():
        image = decode(row["first_frame_latent_bytes"], row["first_frame_latent_shape"], row["first_frame_latent_dtype"])
        clip = decode(row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"])
        assert image.shape == (8, 1, 4, 4) and row["pil_image_shape"] == [32, 32, 3] and row["clip_feature_bytes"] == b""
        assert torch.allclose(image, clip[: 8 * 3 * 4 * 4].reshape(8, 3, 4, 4)[:, :1], atol=1e-5)


def test_the_i2v_student_runs_in_the_stock_image_to_video_pipeline(ltx2_i2v):
    """LTX2ImageToVideoPipeline.from_pretrained(export), its latents' first frame the image's and
    the rest the noise of seed 3, with the card's call: the image's tokens at timestep 0, the
    others and the audio at the student's sigmas, and the video and audio latents our sampler
    gives with the image as the held first frame."""
    import pyarrow.parquet as pq
    from diffusers import LTX2ImageToVideoPipeline
    from PIL import Image

    from distill.data.schema import decode
    from distill.models import build_adapter
    from distill.models.ltx2 import pack_audio, unpack_audio
    from distill.sample import exported_model
    from distill.sampling import Sampler

    run, root = ltx2_i2v
    export = run / "export" / "student"
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2ImageToVideoPipeline"
    card = (export / "README.md").read_text()
    assert "pipeline_tag: image-to-video" in card and ", image=image).to_tuple()" in card
    call = card.split("num_inference_steps=2, ")[1].split(", image=image")[0]
    info = json.loads((export / "distill.json").read_text())
    adapter = build_adapter(exported_model(info, str(root / "model")))
    role = Role("sampler", RoleConfig(), adapter.load(str(export), seed=0).eval().requires_grad_(False))
    text = adapter.text_encoder(torch.device("cpu")).text(["a red square moves left"])[0][None]
    row = pq.read_table(sorted((root / "data_i2v").glob("*.parquet"))[0]).to_pylist()[0]
    image = decode(row["first_frame_latent_bytes"], row["first_frame_latent_shape"], row["first_frame_latent_dtype"])[None]
    g = torch.Generator().manual_seed(3)
    ours = Sampler.from_json(info["sampler"])(adapter, role, text, None, lambda shape: torch.randn(shape, generator=g),
                                              first_frame=image)
    noise = adapter.streams(torch.randn((1, *adapter.latent_shape), generator=torch.Generator().manual_seed(3)))

    pipe = LTX2ImageToVideoPipeline.from_pretrained(export)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"][0]), with_kwargs=True)
    audio_vae = pipe.audio_vae
    audio_noise = unpack_audio(pack_audio(noise["audio"]) * audio_vae.latents_std + audio_vae.latents_mean, 4)
    vae = pipe.vae
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    latents = torch.cat([image, noise["video"][:, :, 1:]], dim=2) * std / vae.config.scaling_factor + mean  # it normalises
    video, audio = pipe(prompt="a red square moves left", image=Image.new("RGB", (32, 32)), num_frames=5, height=32,
                        width=32, num_inference_steps=2, max_sequence_length=8, latents=latents,
                        audio_latents=audio_noise, output_type="latent", return_dict=False, **eval(f"dict({call})"))
    assert len(seen) == 2  # one forward a step: every guidance off
    for t, sigma in zip(seen, info["sampler"]["sigmas"]):
        assert (t[:16] == 0).all() and torch.allclose(t[16:], torch.full_like(t[16:], 1000 * sigma), atol=1e-3)
    ours = adapter.streams(ours)
    assert torch.allclose(ours["video"][:, :, :1], image, atol=1e-6)  # the held first frame
    assert torch.allclose(video, ours["video"] * std / vae.config.scaling_factor + mean, atol=1e-5)
    expected = unpack_audio(pack_audio(ours["audio"]) * audio_vae.latents_std + audio_vae.latents_mean, 4)
    assert torch.allclose(audio, expected, atol=1e-5)


def test_guided_predictions_are_the_pipelines(ltx2_export):
    """CFG with STG, modality isolation and rescale, per stream, as LTX2Pipeline guides: its one
    step from sigma 1 with an Euler scheduler lands on the guided x0, which the adapter's guided
    prediction (the teacher's real score) equals."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    from distill.models import build_adapter
    from distill.models.ltx2 import pack_audio, pack_video, unpack_audio
    from distill.sample import exported_model

    export, root = ltx2_export
    scales = dict(guidance_scale=2.0, audio_guidance_scale=3.0, stg_scale=1.0, audio_stg_scale=0.5,
                  modality_scale=2.0, audio_modality_scale=1.5, guidance_rescale=0.5, audio_guidance_rescale=0.3)
    info = json.loads((export / "distill.json").read_text())
    model = exported_model(info, str(root / "model"))
    for key, value in scales.items():
        if key != "guidance_scale":
            setattr(model, key, value)
    model.stg_blocks = [1]
    adapter = build_adapter(model)
    role = Role("teacher", RoleConfig(), adapter.load(str(export), seed=0).eval().requires_grad_(False))
    encoder = adapter.text_encoder(torch.device("cpu"))
    text, uncond = (encoder.text([p])[0][None] for p in ("a red square moves left", ""))
    x = torch.randn((1, *adapter.latent_shape), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = adapter.streams(adapter.predict_x0_cfg(role, x, torch.ones(1), text, uncond, scales["guidance_scale"]))

    pipe = LTX2Pipeline.from_pretrained(export)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()  # shift 1: sigma 1, then one Euler step to 0
    noise = adapter.streams(x)
    audio_vae = pipe.audio_vae
    audio_noise = unpack_audio(pack_audio(noise["audio"]) * audio_vae.latents_std + audio_vae.latents_mean, 4)
    video, audio = pipe(prompt="a red square moves left", negative_prompt="", num_frames=5, height=32, width=32,
                        num_inference_steps=1, max_sequence_length=8, latents=pack_video(noise["video"]),
                        audio_latents=audio_noise, spatio_temporal_guidance_blocks=[1], use_cross_timestep=False,
                        frame_rate=24.0, output_type="latent", return_dict=False, **scales)
    vae = pipe.vae
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    assert torch.allclose(video, ours["video"] * std / vae.config.scaling_factor + mean, atol=1e-5)
    expected = unpack_audio(pack_audio(ours["audio"]) * audio_vae.latents_std + audio_vae.latents_mean, 4)
    assert torch.allclose(audio, expected, atol=1e-5)
    plain = adapter.streams(super(type(adapter), adapter).predict_x0_cfg(role, x, torch.ones(1), text, uncond, 2.0))
    assert not torch.allclose(plain["video"], ours["video"], atol=1e-3)  # the extra guidances moved it


def test_a_timestep_conditioned_vae_decodes_at_the_pipelines_decode_timestep(tmp_path):
    """A VAE whose decoder is timestep-conditioned (LTX-Video's later VAEs) fails without a
    timestep; validation decodes at the pipeline's decode_timestep, 0, as LTX2Pipeline does."""
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(latent_channels=8, block_out_channels=(8,), decoder_block_out_channels=(8,),
                                 layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                                 spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,),
                                 decoder_inject_noise=(False, False), downsample_type=("spatiotemporal",),
                                 upsample_residual=(False,), upsample_factor=(1,), patch_size=4, decoder_causal=False,
                                 timestep_conditioning=True)
    vae.save_pretrained(tmp_path / "vae")
    adapter = tiny_adapter()
    adapter.cfg.path, adapter.cfg.vae = str(tmp_path), "ltx2"  # a folder with just the VAE
    x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixels = adapter.decode(x)
        expected = vae.decode(adapter.streams(x)["video"], torch.zeros(2), return_dict=False)[0].clamp(-1, 1)
    assert pixels.shape == (2, 3, 5, 32, 32) and torch.allclose(pixels, expected, atol=1e-6)


def test_the_sound_is_rendered_as_the_pipeline_renders_it(ltx2_export):
    """The audio stream through the audio VAE and vocoder as LTX2Pipeline renders it (the same
    waveform from the same latents); `distill.sample --out clip.mp4` carries it as an AAC track
    beside the video at its 24 fps, and each validation wrote the first sample with its sound."""
    import av
    from diffusers import LTX2Pipeline

    from distill.models.ltx2 import pack_audio, unpack_audio
    from distill.sample import load_exported, main

    export, root = ltx2_export
    adapter, _, _ = load_exported(export)
    x = torch.randn((1, *adapter.latent_shape), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sound = adapter.decode_audio(x)
    pipe = LTX2Pipeline.from_pretrained(export)
    parts, audio_vae = adapter.streams(x), pipe.audio_vae
    with torch.no_grad():  # the pipeline's decoding of its final audio latents
        tokens = pack_audio(parts["audio"]) * audio_vae.latents_std + audio_vae.latents_mean
        expected = pipe.vocoder(audio_vae.decode(unpack_audio(tokens, 4), return_dict=False)[0])
    assert sound.rate == pipe.vocoder.config.output_sampling_rate and sound.fps == 24.0
    assert sound.waveforms.shape == expected.shape and torch.allclose(sound.waveforms, expected.clamp(-1, 1), atol=1e-5)

    out = root / "clip.mp4"
    assert main([str(export), "--prompt", "a red square moves left", "--out", str(out)]) == 0
    with av.open(str(out)) as clip:
        assert sorted(s.type for s in clip.streams) == ["audio", "video"]
        assert clip.streams.audio[0].rate == sound.rate and clip.streams.video[0].average_rate == 24
    assert list((root / "run" / "samples").glob("student_2step-step*-sound.mp4"))


def test_image_to_video_guidance_keeps_the_image_as_the_first_frame():
    """The rescale of the guided x0 scales every frame; the held first frame of an
    image-to-video prediction stays the image latent, as the pipeline keeps it."""
    adapter = tiny_adapter(["model.image_condition=first_frame", "model.guidance_rescale=0.5",
                            "model.modality_scale=2"])
    role = Role("teacher", RoleConfig(), adapter.load(None, seed=3).eval())
    g = torch.Generator().manual_seed(0)
    x, text, uncond = (torch.randn(s, generator=g) for s in ((2, *adapter.latent_shape), (2, 8, 32), (2, 8, 32)))
    image = torch.randn((2, 8, 1, 4, 4), generator=g)
    with torch.no_grad():
        x0 = adapter.predict_x0_cfg(role, x, torch.full((2,), 0.7), text, uncond, 3.0, first_frame=image)
    video = adapter.streams(x0)["video"]
    assert torch.equal(video[:, :, :1], image)
