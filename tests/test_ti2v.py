"""Wan2.2-TI2V at a tiny size, image-to-video end to end: a diffusers folder in the
real layout (48-channel Wan2.2 VAE, transformer, umT5), FastVideo's i2v parquet
from `python -m distill.preprocess --task i2v`, DMD2 through launch.py on 1 and
2 ranks, resume, validation beside the conditioning image, and the export in
diffusers' WanImageToVideoPipeline (expand_timesteps)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_bit_identical_runs, read_metrics, run_launch, write_tiny_pipeline_parts
from test_preprocess import write_video

LATENT = [48, 2, 4, 4]  # 5 frames at 64x64 through the Wan2.2 VAE (4x16x16)
ARCH = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=48, out_channels=48,
            text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, rope_max_seq_len=32)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """(model folder, i2v dataset folder)."""
    import subprocess
    import sys

    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("ti2v")
    model = write_tiny_pipeline_parts(root / "tiny-ti2v", wan22=True)
    torch.manual_seed(0)
    WanTransformer3DModel(**{**ARCH, "patch_size": tuple(ARCH["patch_size"])}).save_pretrained(model / "transformer")
    videos = root / "videos"
    videos.mkdir()
    captions = []
    for i in range(4):
        write_video(videos / f"clip{i}.mp4", frames=6, size=(64, 64), seed=i)
        captions.append({"file_name": f"clip{i}.mp4", "caption": "a red square moves left" if i % 2 else "a blue square"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    result = subprocess.run(
        [sys.executable, "-m", "distill.preprocess", "--task", "i2v", "--model", str(model), "--captions",
         str(root / "captions.jsonl"), "--videos", str(videos), "--out", str(root / "data"), "--height", "64",
         "--width", "64", "--frames", "5", "--batch-size", "2", "--max-text-len", "8", "--row-group-size", "1"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return model, root / "data"


def common(ti2v):
    model, data = ti2v
    return [f"model.path={model}", f"model.latent_shape={LATENT}".replace(" ", ""), "model.image_condition=first_frame",
            "model.vae=wan", "data=parquet", f"data.path={data}",
            # one-row groups read in dealt order: 2 ranks x 1 row read the global batches 1 rank x 2 does
            "data.shuffle_window=1", "method.rollout=data", "method.student_steps=[999,500]",
            "method.generator_update_interval=2", "validation.num_samples=2", "roles.student.ema_decay=0.9"]


@pytest.fixture(scope="module")
def one_rank(ti2v, tmp_path_factory):
    run = tmp_path_factory.mktemp("ti2v-run") / "one"
    result = run_launch([*common(ti2v), "data.batch_size=2", "training.max_steps=4", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    return run


def test_preprocess_i2v_writes_fastvideos_image_to_video_columns(ti2v):
    _, data = ti2v
    table = pq.read_table(sorted(data.glob("*.parquet"))[0]).to_pydict()
    for prefix in ("clip_feature", "first_frame_latent", "pil_image"):
        assert {f"{prefix}_bytes", f"{prefix}_shape", f"{prefix}_dtype"} <= set(table)
    assert table["first_frame_latent_shape"][0] == LATENT and table["vae_latent_shape"][0] == LATENT
    assert table["pil_image_shape"][0] == [64, 64, 3] and table["pil_image_dtype"][0] == "uint8"
    assert table["clip_feature_bytes"][0] == b"" and table["clip_feature_shape"][0] == []  # TI2V has no image encoder
    from distill.data.schema import decode

    first = decode(table["first_frame_latent_bytes"][0], LATENT, "float32")
    video = decode(table["vae_latent_bytes"][0], LATENT, "float32")
    # the Wan2.2 VAE is causal in time: the image's latent is the clip's first latent frame
    assert torch.allclose(first[:, 0], video[:, 0], atol=1e-5)
    assert not torch.allclose(first[:, 1], video[:, 1], atol=1e-3)  # black frames after the image


def test_i2v_dmd2_runs_and_validation_shows_the_conditioning_image(one_rank):
    records = read_metrics(one_rank)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss/critic"]) for r in records)
    grid = np.asarray(Image.open(one_rank / "samples" / "student_2step-step000004.png"))
    real = np.asarray(Image.open(one_rank / "samples" / "real.png"))
    # each clip's strip: the image, then its 5 frames. The image tile is the same in every
    # grid; the student's first frame is the real clip's (held), its later frames are its own
    scale = grid.shape[0] // 64
    rows = slice(4, 4 + 64 * scale)

    def tile(k):
        return slice(4 + k * 64 * scale, 4 + (k + 1) * 64 * scale)

    def gap(k):
        return np.abs(grid[rows, tile(k)].astype(int) - real[rows, tile(k)].astype(int))

    assert gap(0).max() == 0
    assert gap(1).max() <= 2  # the image's latent, up to float rounding in two VAE encodes
    assert gap(2).mean() > max(1.0, 10 * gap(1).mean())  # the generated frames are not the clip's


def test_two_ranks_equal_one_rank(ti2v, one_rank, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "two"
    result = run_launch([*common(ti2v), "data.batch_size=1", "launcher.nproc_per_node=2", "training.max_steps=4",
                         f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    for a, b in zip(read_metrics(run), read_metrics(one_rank)):
        for key in b:
            if key.startswith(("loss/", "grad_norm/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    for role in ("student", "critic"):
        mine = load_file(run / "export" / role / "transformer" / "diffusion_pytorch_model.safetensors")
        ref = load_file(one_rank / "export" / role / "transformer" / "diffusion_pytorch_model.safetensors")
        assert max((mine[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5


def test_resume_is_bit_identical(ti2v, one_rank, tmp_path):
    run = tmp_path / "resumed"
    args = [*common(ti2v), "data.batch_size=2", f"hydra.run.dir={run}"]
    assert run_launch([*args, "training.max_steps=2"]).returncode == 0
    second = run_launch([*args, "training.max_steps=4"])
    assert second.returncode == 0, second.stderr
    assert "resumed from" in (run / "launch.log").read_text()
    assert_bit_identical_runs(run, one_rank)


def test_export_runs_in_diffusers_ti2v_pipeline_as_the_student(ti2v, one_rank):
    """WanImageToVideoPipeline(expand_timesteps=True) with the exported student: the
    transformer, fed the pipeline's own conditioned inputs, gives what our adapter
    gives for the trained student, and the video starts at the image's latent."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline,
                           WanTransformer3DModel)
    from transformers import AutoTokenizer, UMT5EncoderModel

    from distill.checkpoint import read_complete
    from distill.config.io import load_config
    from distill.export import trained_module
    from distill.models import build_adapter

    model, _ = ti2v
    exported = WanTransformer3DModel.from_pretrained(one_rank / "export" / "student", subfolder="transformer")
    vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae")
    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(model / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(model / "text_encoder"),
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=exported, expand_timesteps=True)
    seen = []
    pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs, out[0])), with_kwargs=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    text = torch.randn((1, 8, 32), generator=torch.Generator().manual_seed(1))
    latents = pipe(image=image, prompt_embeds=text, height=64, width=64, num_frames=5,
                   num_inference_steps=2, guidance_scale=1.0, max_sequence_length=8, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).frames
    pixels = pipe.video_processor.preprocess(image, height=64, width=64).unsqueeze(2)
    with torch.no_grad():
        condition = vae.encode(pixels).latent_dist.mode()
    assert torch.allclose(latents[:, :, :1], condition, atol=1e-5)  # mean 0, std 1 in the tiny VAE

    config = load_config(one_rank / "config.yaml")
    checkpoint = read_complete(one_rank)
    adapter = build_adapter(config.model)
    student = trained_module(checkpoint, config, adapter, "student")
    for kwargs, out in seen:
        x, t = kwargs["hidden_states"], kwargs["timestep"]
        per_frame = (LATENT[2] // 2) * (LATENT[3] // 2)
        assert (t[:, :per_frame] == 0).all() and (t[:, per_frame:] == t[0, -1]).all()  # the image's tokens at 0
        with torch.no_grad():
            mine = adapter.forward(student, x, t[:, -1], kwargs["encoder_hidden_states"], first_frame=x[:, :, :1])
        assert torch.allclose(mine, out, atol=1e-5)
