"""Image-to-video at a tiny size, end to end, for both ways Wan conditions on an image:
  - Wan2.2-TI2V (model.image_condition=first_frame): 48-channel Wan2.2 VAE;
  - Wan2.1-I2V-14B (concat): mask + image latent on channels, a CLIP image encoder.
Each is a diffusers folder in the real layout, FastVideo's i2v parquet from
`python -m distill.preprocess --task i2v`, DMD2 through launch.py on 1 and 2 ranks,
resume, validation beside the conditioning image, and the export in diffusers'
WanImageToVideoPipeline."""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import (ROOT, assert_bit_identical_runs, assert_runs_match, read_metrics, run_launch,
                      write_tiny_pipeline_parts)
from test_preprocess import write_video

BLOCKS = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, text_dim=32, freq_dim=16, ffn_dim=32,
              num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


@dataclass
class Family:
    name: str
    condition: str  # model.image_condition
    latent: list  # 5 frames at 64x64 through the family's VAE
    arch: dict
    wan22_vae: bool = False
    clip: bool = False  # an image encoder in the folder


FAMILIES = {
    "ti2v_5b": Family("ti2v_5b", "first_frame", [48, 2, 4, 4], dict(BLOCKS, in_channels=48, out_channels=48),
                      wan22_vae=True),
    "i2v_14b": Family("i2v_14b", "concat", [16, 2, 8, 8],
                      dict(BLOCKS, in_channels=36, out_channels=16, image_dim=16, added_kv_proj_dim=16), clip=True),
}


def write_clip_encoder(folder: Path) -> None:
    """A tiny CLIP ViT (width 16, 32x32 images in 16x16 patches: 5 tokens) and its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "image_processor")


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, built_once):
    """(Family, model folder, i2v dataset folder), built once for every worker."""
    fam = FAMILIES[request.param]
    root = built_once(f"i2v-{fam.name}", functools.partial(write_family, fam))
    return fam, root / "model", root / "data"


def write_family(fam: Family, root: Path) -> None:
    """A tiny model of the family and a preprocessed 4-clip image-to-video dataset."""
    import subprocess
    import sys

    from diffusers import WanTransformer3DModel

    model = write_tiny_pipeline_parts(root / "model", wan22=fam.wan22_vae)
    if fam.clip:
        write_clip_encoder(model)
    torch.manual_seed(0)
    WanTransformer3DModel(**fam.arch).save_pretrained(model / "transformer")
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


def common(family):
    fam, model, data = family
    return [f"model.path={model}", f"model.latent_shape={fam.latent}".replace(" ", ""),
            f"model.image_condition={fam.condition}", "model.vae=wan", "data=parquet", f"data.path={data}",
            # one-row groups read in dealt order: 2 ranks x 1 row read the global batches 1 rank x 2 does
            "data.shuffle_window=1", "method.rollout=data", "method.student_steps=[999,500]",
            "method.generator_update_interval=2", "validation.num_samples=2", "roles.student.ema_decay=0.9"]


@pytest.fixture(scope="session")
def one_rank(family, built_once):
    def make(run):
        # launched: the resume test compares a launched run with it bit for bit
        result = run_launch([*common(family), "data.batch_size=2", "training.max_steps=4", f"hydra.run.dir={run}"])
        assert result.returncode == 0, result.stderr

    return built_once(f"i2v-{family[0].name}-one-rank", make)


def test_preprocess_i2v_writes_fastvideos_image_to_video_columns(family):
    fam, model, data = family
    latent = fam.latent
    table = pq.read_table(sorted(data.glob("*.parquet"))[0]).to_pydict()
    for prefix in ("clip_feature", "first_frame_latent", "pil_image"):
        assert {f"{prefix}_bytes", f"{prefix}_shape", f"{prefix}_dtype"} <= set(table)
    assert table["first_frame_latent_shape"][0] == latent and table["vae_latent_shape"][0] == latent
    assert table["pil_image_shape"][0] == [64, 64, 3] and table["pil_image_dtype"][0] == "uint8"
    from distill.data.schema import decode

    if fam.clip:  # the penultimate hidden states of the CLIP ViT for the first frame, as the pipeline takes them
        from transformers import CLIPImageProcessor, CLIPVisionModel

        assert table["clip_feature_shape"][0] == [5, 16] and table["clip_feature_dtype"][0] == "float32"
        pixels = decode(table["pil_image_bytes"][0], [64, 64, 3], "uint8").numpy()
        inputs = CLIPImageProcessor.from_pretrained(model / "image_processor")(images=Image.fromarray(pixels),
                                                                               return_tensors="pt")
        with torch.no_grad():
            want = CLIPVisionModel.from_pretrained(model / "image_encoder")(
                **inputs, output_hidden_states=True).hidden_states[-2][0]
        assert torch.allclose(decode(table["clip_feature_bytes"][0], [5, 16], "float32"), want, atol=1e-5)
    else:  # TI2V has no image encoder
        assert table["clip_feature_bytes"][0] == b"" and table["clip_feature_shape"][0] == []
    first = decode(table["first_frame_latent_bytes"][0], latent, "float32")
    video = decode(table["vae_latent_bytes"][0], latent, "float32")
    # the Wan VAEs are causal in time: the image's latent is the clip's first latent frame
    assert torch.allclose(first[:, 0], video[:, 0], atol=1e-5)
    assert not torch.allclose(first[:, 1], video[:, 1], atol=1e-3)  # black frames after the image


def test_i2v_dmd2_runs_and_validation_shows_the_conditioning_image(family, one_rank):
    records = read_metrics(one_rank)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss/critic"]) for r in records)
    grid = np.asarray(Image.open(one_rank / "samples" / "student_2step-step000004.png"))
    real = np.asarray(Image.open(one_rank / "samples" / "real.png"))
    # each clip's strip: the image, then its 5 frames. The image tile is the same in every
    # grid; with first_frame conditioning the student's first frame is the real clip's
    # (held), its later frames are its own
    scale = grid.shape[0] // 64
    rows = slice(4, 4 + 64 * scale)

    def tile(k):
        return slice(4 + k * 64 * scale, 4 + (k + 1) * 64 * scale)

    def gap(k):
        return np.abs(grid[rows, tile(k)].astype(int) - real[rows, tile(k)].astype(int))

    assert gap(0).max() == 0
    if family[0].condition == "first_frame":
        assert gap(1).max() <= 2  # the image's latent, up to float rounding in two VAE encodes
        assert gap(2).mean() > max(1.0, 10 * gap(1).mean())  # the generated frames are not the clip's
    else:  # generated from the channels: the untrained student's frames are its own
        assert gap(2).mean() > 1.0


@pytest.mark.multiprocess
def test_two_ranks_equal_one_rank(family, one_rank, tmp_path):
    run = tmp_path / "two"
    result = run_launch([*common(family), "data.batch_size=1", "launcher.nproc_per_node=2", "training.max_steps=4",
                         f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    assert_runs_match(run, one_rank)


def test_resume_is_bit_identical(family, one_rank, tmp_path):
    run = tmp_path / "resumed"
    args = [*common(family), "data.batch_size=2", f"hydra.run.dir={run}"]
    assert run_launch([*args, "training.max_steps=2"]).returncode == 0
    second = run_launch([*args, "training.max_steps=4"])
    assert second.returncode == 0, second.stderr
    assert "resumed from" in (run / "launch.log").read_text()
    assert_bit_identical_runs(run, one_rank)


def test_export_runs_in_diffusers_pipeline_as_the_student(family, one_rank):
    """WanImageToVideoPipeline (expand_timesteps for TI2V; image encoder and channel
    concatenation for I2V-14B) with the exported student: the transformer, fed the
    pipeline's own conditioned inputs, gives what our adapter gives for the trained
    student on the same conditioning."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline,
                           WanTransformer3DModel)
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    from distill.checkpoint import read_complete
    from distill.config.io import load_config
    from distill.export import trained_module
    from distill.models import build_adapter

    fam, model, _ = family
    exported = WanTransformer3DModel.from_pretrained(one_rank / "export" / "student", subfolder="transformer")
    vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae")
    image_parts = dict(image_encoder=CLIPVisionModel.from_pretrained(model / "image_encoder"),
                       image_processor=CLIPImageProcessor.from_pretrained(model / "image_processor")) if fam.clip else {}
    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(model / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(model / "text_encoder"), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=exported,
        expand_timesteps=fam.condition == "first_frame", **image_parts)
    seen = []
    pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs, out[0])), with_kwargs=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    text = torch.randn((1, 8, 32), generator=torch.Generator().manual_seed(1))
    latents = pipe(image=image, prompt_embeds=text, height=64, width=64, num_frames=5,
                   num_inference_steps=2, guidance_scale=1.0, max_sequence_length=8, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).frames
    pixels = pipe.video_processor.preprocess(image, height=64, width=64).unsqueeze(2)
    with torch.no_grad():
        condition = vae.encode(pixels).latent_dist.mode()  # mean 0, std 1 in the tiny Wan2.2 VAE
    if fam.condition == "first_frame":  # the pipeline's video starts at the image's latent
        assert torch.allclose(latents[:, :, :1], condition, atol=1e-5)

    config = load_config(one_rank / "config.yaml")
    adapter = build_adapter(config.model)
    student = trained_module(read_complete(one_rank), config, adapter, "student")
    c = fam.latent[0]
    assert len(seen) == 2
    for kwargs, out in seen:
        x, t, text = kwargs["hidden_states"], kwargs["timestep"], kwargs["encoder_hidden_states"]
        if fam.condition == "first_frame":
            per_frame = (fam.latent[2] // 2) * (fam.latent[3] // 2)
            assert (t[:, :per_frame] == 0).all() and (t[:, per_frame:] == t[0, -1]).all()  # the image's tokens at 0
            cond, t = {"first_frame": x[:, :, :1]}, t[:, -1]
        else:  # [noisy latents, mask, image latent] and the CLIP embeddings
            mask = torch.zeros_like(x[:, c:c + 4])
            mask[:, :, 0] = 1
            assert torch.equal(x[:, c:c + 4], mask)
            cond = {"image_latent": x[:, c + 4:], "image_embeds": kwargs["encoder_hidden_states_image"]}
            x = x[:, :c]
        with torch.no_grad():
            mine = adapter.forward(student, x, t, text, **cond)
        assert torch.allclose(mine, out, atol=1e-5)
