"""Qwen-Image (model.family=qwen_image): the packed layout, the pipeline's shift and
text mask checked by hand and against diffusers; images preprocessed through the
family's encoders, trained on, and the export sampled by a stock QwenImagePipeline
(DMD2 and finetuning on 1 and 2 ranks: tests/test_families.py)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import (assert_runs_match, compose_config, run_launch, train_here, write_tiny_family,
                      write_tiny_qwen_image_parts)
from distill.config import validate
from distill.config.validate import ConfigError

TINY = ["model=qwen_image_tiny"]


def tiny_adapter(overrides=()):
    from distill.models import build_adapter

    return build_adapter(validate(compose_config([*TINY, *overrides])).model)


def test_packing_is_the_pipelines_and_unpacks_exactly():
    from diffusers import QwenImagePipeline

    from distill.models.qwen_image import pack, unpack

    x = torch.arange(2 * 4 * 1 * 6 * 8, dtype=torch.float32).reshape(2, 4, 1, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 3 * 4, 16)  # (H/2)(W/2) tokens of 4C channels
    # token 0 holds the 2x2 patch at the top left, channel-major: c0 (0,0) (0,1) (1,0) (1,1), then c1 ...
    assert tokens[0, 0, :4].tolist() == [0.0, 1.0, 8.0, 9.0]
    assert tokens[0, 0, 4].item() == 48.0  # channel 1 starts 6 x 8 further
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(x[:, :, 0], 2, 4, 6, 8))
    assert torch.equal(unpack(tokens, 6, 8), x)
    # the pipeline's unpacking of a 48x64 image (8x VAE) gives the same latents
    assert torch.equal(QwenImagePipeline._unpack_latents(tokens, 48, 64, 8), x)


def test_the_shift_is_the_pipelines_for_the_image_size():
    """1328x1328 -> 166x166 latents -> 6889 packed tokens: mu = 0.5 + 0.4 * 6633 / 7936 =
    0.83432, shift exp(mu) = 2.3033; diffusers' dynamic scheduler gives the same sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from distill.models.qwen_image import QwenImageAdapter, QwenImageConfig

    adapter = QwenImageAdapter(QwenImageConfig())  # the preset's 1328x1328
    assert adapter.shift == pytest.approx(math.exp(0.5 + 0.4 * 6633 / 7936)) == pytest.approx(2.3033, abs=1e-4)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential",
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192)
    grid = [1.0, 0.75, 0.5, 0.25]
    scheduler.set_timesteps(sigmas=grid, mu=0.5 + 0.4 * 6633 / 7936)
    assert adapter.shift_sigma(torch.tensor(grid)).tolist() == pytest.approx(scheduler.sigmas[:-1].tolist(), abs=1e-6)
    # a fixed shift when dynamic_shift is off (Qwen-Image-Lightning distils at shift 3)
    assert QwenImageAdapter(QwenImageConfig(dynamic_shift=False, shift=3.0)).shift == 3.0


def test_padded_text_attends_as_the_pipeline_does():
    """The data pads each prompt's embedding with zeros: the adapter's mask keeps exactly the
    prompt's tokens, so the velocity equals the transformer's on the unpadded prompt (the
    pipeline's call for one prompt, mask None), and the sigma input is t / 1000."""
    from distill.config.schema import RoleConfig
    from distill.roles import Role

    adapter = tiny_adapter()
    net = adapter.load(None, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 1, 8, 8, generator=g)
    prompt = torch.randn(1, 5, 32, generator=g)
    padded = torch.cat([prompt, torch.zeros(1, 3, 32)], dim=1)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        v = adapter.predict_velocity(Role("r", RoleConfig(), net), x, sigma, padded)
        from distill.models.qwen_image import pack, unpack

        want = net(hidden_states=pack(x), encoder_hidden_states=prompt, timestep=sigma, img_shapes=[[(1, 4, 4)]],
                   return_dict=False)[0]
        unmasked = net(hidden_states=pack(x), encoder_hidden_states=padded, timestep=sigma, img_shapes=[[(1, 4, 4)]],
                       return_dict=False)[0]
    assert torch.allclose(v, unpack(want, 8, 8), atol=1e-6)
    assert not torch.allclose(v, unpack(unmasked, 8, 8), atol=1e-4)  # the padding would matter unmasked


def test_wrong_shapes_and_causal_roles_are_refused():
    with pytest.raises(ConfigError) as err:
        validate(compose_config([*TINY, "model.latent_shape=[4,2,8,8]"]))
    assert "model.latent_shape=[4, 2, 8, 8]: model.family=qwen_image takes images" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate(compose_config([*TINY, "model.text_dim=16"]))
    assert "model.text_dim=16 does not match joint_attention_dim=32 of model.arch" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate(compose_config([*TINY, "model.vae=wan"]))
    assert "model.vae=wan: model.family=qwen_image decodes with qwen_image, identity" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate(compose_config([*TINY, "roles.student.causal=true", "model.chunk_frames=1"]))
    assert "roles.student.causal=true: model.family=qwen_image has no block-causal variant" in str(err.value)


@pytest.mark.multiprocess
def test_context_parallel_run_equals_one_rank(tmp_path):
    """diffusers' context-parallel plan for the Qwen-Image transformer (image and text tokens
    split at the first block, Ulysses attention) on 2 ranks of one context group, with the GAN
    head reading the gathered image tokens: the same records and exports as one rank."""
    common = [*TINY, "method.gan.enabled=true", "method.generator_update_interval=2", "method.generator_lr=1e-3",
              "method.critic_lr=1e-3", "data.batch_size=2", "training.max_steps=4", "validation.num_samples=2",
              "validation.health.diversity_seeds=0"]
    one = train_here([*common, f"hydra.run.dir={tmp_path / 'one'}"])
    result = run_launch([*common, "launcher.nproc_per_node=2", "parallel.context=2",
                         f"hydra.run.dir={tmp_path / 'cp'}"])
    assert result.returncode == 0, result.stderr
    assert_runs_match(tmp_path / "cp", one)


def write_images(folder, count=4):
    """Tiny PNG images, their captions, and one file that is no image."""
    from PIL import Image

    folder.mkdir()
    rows = []
    for i in range(count):
        pixels = torch.randint(0, 255, (40, 56, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"image{i}.png")
        rows.append({"file_name": f"image{i}.png", "caption": "a red square moves left" if i % 2 else "a blue square"})
    (folder / "broken.png").write_bytes(b"not a png" * 10)
    rows.append({"file_name": "broken.png", "caption": "a square"})
    captions = folder.parent / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in rows))
    return captions


@pytest.fixture(scope="module")
def qwen_export(tmp_path_factory):
    """A tiny Qwen-Image pipeline folder; images + captions preprocessed through its VAE and
    Qwen2.5-VL into a parquet dataset; a 2-step student distilled on that dataset (its input
    rolled out from the data's latents) with the deterministic (ODE-step) sampler, and exported."""
    from distill.preprocess import main as preprocess
    from distill.run import train

    root = tmp_path_factory.mktemp("qwen")
    base = write_tiny_family(root / "model", "qwen_image_tiny", write_tiny_qwen_image_parts)
    captions = write_images(root / "images")
    # no --family: the folder's QwenImageTransformer2DModel names it
    assert preprocess(["--model", str(base), "--captions", str(captions), "--videos", str(root / "images"),
                       "--out", str(root / "data"), "--frames", "1", "--height", "64", "--width", "64",
                       "--max-text-len", "8", "--batch-size", "2"]) == 0
    config = validate(compose_config([
        *TINY, f"model.path={base}", "model.vae=qwen_image", "model.text_encoder=family", "data=parquet",
        f"data.path={root / 'data'}", "method.student_steps=[1000,500]", "method.student_sampler=deterministic",
        "method.rollout=data",  # the student's input from the images' latents (tests/test_families.py: simulated)
        "training.max_steps=2", "validation.num_samples=1", "validation.health.diversity_seeds=0"]))
    train(config, root / "run")
    return root / "run" / "export" / "student", root


def test_images_preprocess_into_one_frame_latents(qwen_export):
    """Each image's row: the VAE's posterior mean [4, 1, 8, 8] of the 64x64 crop, the prompt's
    Qwen2.5-VL embedding [L, 32], media_type image; the broken file is skipped."""
    import pyarrow.parquet as pq

    from distill.data.parquet import ParquetIndex, Shapes

    _, root = qwen_export
    table = pq.read_table(list((root / "data").glob("*.parquet")))
    assert sorted(table.column("id").to_pylist()) == [f"image{i}.png" for i in range(4)]
    assert set(table.column("media_type").to_pylist()) == {"image"}
    assert table.column("vae_latent_shape").to_pylist() == [[4, 1, 8, 8]] * 4
    assert all(shape[1] == 32 for shape in table.column("text_embedding_shape").to_pylist())
    index = ParquetIndex(str(root / "data"), Shapes((4, 1, 8, 8), 8, 32))
    assert index.num_rows == 4


def test_the_stock_pipeline_samples_the_exported_student(qwen_export, tmp_path):
    """QwenImagePipeline.from_pretrained(export) runs the student at its sigmas (t / 1000 as
    the network's input) and gives the latents `python -m distill.sample` gives."""
    from diffusers import QwenImagePipeline

    from distill.models.qwen_image import unpack
    from distill.sample import main

    export, _ = qwen_export
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    sigmas = json.loads((export / "distill.json").read_text())["sampler"]["sigmas"]
    pipe = QwenImagePipeline.from_pretrained(export)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"][0].item()),
                                               with_kwargs=True)
    torch.manual_seed(3)
    latents = pipe("a red square moves left", num_inference_steps=2, height=64, width=64, max_sequence_length=8,
                   output_type="latent").images
    assert seen == pytest.approx(sigmas, abs=1e-6)
    out = tmp_path / "ours.safetensors"
    assert main([str(export), "--prompt", "a red square moves left", "--seeds", "3", "--out", str(out)]) == 0
    ours = load_file(out)["samples"]
    assert ours.shape == (1, 4, 1, 8, 8)
    assert torch.allclose(unpack(latents, 8, 8), ours, atol=1e-5), (unpack(latents, 8, 8) - ours).abs().max()
