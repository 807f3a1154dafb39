"""The exported student in stock diffusers: `WanPipeline.from_pretrained(EXPORT)` called
with N steps and guidance 1 samples exactly what `python -m distill.sample` does."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config, write_tiny_pipeline_parts
from distill.config import validate
from distill.stock_scheduler import fit, stretched_sigmas

PROMPT = "a red square moves left"
# the tiny model's latents [16, 3, 16, 16] are what the tiny Wan VAE gives 9 frames at 128 x 128
PIXELS = dict(height=128, width=128, num_frames=9)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny Wan pipeline folder (transformer, VAE, umT5, tokenizer; no model_index.json)."""
    base = tmp_path_factory.mktemp("tiny-wan-pipeline")
    build_adapter_net(seed=123).save_pretrained(base / "transformer")
    return write_tiny_pipeline_parts(base)


def distil(base, run, overrides=()):
    from distill.run import train

    train(validate(compose_config([f"model.path={base}", "model.vae=wan", "model.text_encoder=family",
                                   "model.shift=5.0", "training.max_steps=3", "validation.num_samples=1",
                                   *overrides])), run)
    return run / "export" / "student"


@pytest.fixture(scope="module")
def exports(pipeline_folder, tmp_path_factory):
    """Students of 3 iterations: the recipe's 3 listed sigmas, 4 warped by shift 5, 4 that
    no shift / shift_terminal pair gives, two experts (Wan2.2 A14B's layout) at 3, and a
    deterministic student sampler (FastGen's "ode") at 3."""
    root = tmp_path_factory.mktemp("stock")
    pair = root / "pair-model"
    shutil.copytree(pipeline_folder, pair)
    build_adapter_net(seed=7).save_pretrained(pair / "transformer_2")
    return {
        3: distil(pipeline_folder, root / "three"),
        4: distil(pipeline_folder, root / "four", ["method.student_steps=[1000,750,500,250]", "method.warp_steps=true"]),
        "uneven": distil(pipeline_folder, root / "uneven", ["method.student_steps=[1000,900,300,200]"]),
        "pair": distil(pair, root / "pair", ["model.boundary_ratio=0.9"]),
        "ode": distil(pipeline_folder, root / "ode", ["method.student_sampler=deterministic"]),
    }


def build_adapter_net(seed):
    from distill.models import build_adapter

    return build_adapter(validate(compose_config()).model).load(None, seed=seed)


def sample_stock(export, steps, seed):
    """The stock pipeline, nothing but the folder: latents and the timesteps its transformer saw."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(export)
    seen = []  # (network, timestep) of each call
    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name) is not None:
            getattr(pipe, name).register_forward_pre_hook(
                lambda m, a, kw, name=name: seen.append((name, kw["timestep"][0].item())), with_kwargs=True)
    torch.manual_seed(seed)  # the re-noising draws from the global generator
    latents = pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, max_sequence_length=8,
                   output_type="latent", **PIXELS).frames
    return latents, seen


def sample_ours(export, seed, tmp_path):
    from distill.sample import main

    out = tmp_path / f"ours-{seed}.safetensors"
    assert main([str(export), "--prompt", PROMPT, "--seeds", str(seed), "--out", str(out)]) == 0
    return load_file(out)["samples"]


@pytest.mark.parametrize("name,steps", [(3, 3), (4, 4), ("pair", 3), ("ode", 3)])
def test_the_stock_pipeline_samples_the_student_as_distill_sample_does(exports, name, steps, tmp_path):
    """Two experts: the pipeline's transformer at t >= 900, transformer_2 below, as the pair routes."""
    export = exports[name]
    sigmas = json.loads((export / "distill.json").read_text())["sampler"]["sigmas"]
    assert len(sigmas) == steps
    for seed in (0, 7):
        stock, seen = sample_stock(export, steps, seed)
        ours = sample_ours(export, seed, tmp_path)
        assert stock.shape == ours.shape == (1, 16, 3, 16, 16)
        assert torch.allclose(stock, ours, atol=1e-5), (stock - ours).abs().max()
        assert [t for _, t in seen] == pytest.approx([1000 * s for s in sigmas], abs=1e-2)
        assert [n for n, _ in seen] == [("transformer_2" if name == "pair" and s < 0.9 else "transformer")
                                        for s in sigmas]
    # the seed matters: a different one gives a different sample
    assert not torch.allclose(sample_stock(export, steps, 1)[0], ours, atol=1e-3)


def test_a_deterministic_student_exports_the_ode_step(exports):
    """student_sampler=deterministic: plain Euler steps in diffusers (no stochastic_sampling),
    ComfyUI's euler sampler, and a card that says so."""
    export = exports["ode"]
    assert json.loads((export / "distill.json").read_text())["sampler"]["deterministic"] is True
    assert json.loads((export / "scheduler" / "scheduler_config.json").read_text())["stochastic_sampling"] is False
    nodes = json.loads((export / "comfyui_workflow.json").read_text())
    assert nodes["8"]["inputs"]["sampler_name"] == "euler"
    card = (export / "README.md").read_text()
    assert "Euler step (deterministic)" in card and "global generator" not in card
    assert "deterministic" not in json.loads((exports[3] / "distill.json").read_text())["sampler"]


def test_the_export_is_a_stock_pipeline_folder(exports, pipeline_folder):
    export = exports[3]
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"] and index["transformer_2"] == [None, None]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    saved = json.loads((pipeline_folder / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert index["tokenizer"] == ["transformers", saved]  # the class its tokenizer_config.json names
    for part in ("vae", "text_encoder", "tokenizer"):  # linked by default
        assert (export / part).is_symlink() and (export / part).resolve() == (pipeline_folder / part).resolve()
    scheduler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["stochastic_sampling"] is True and scheduler["shift_terminal"] == pytest.approx(0.522)
    assert scheduler["shift"] == pytest.approx(0.967047, abs=1e-6)
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "pipeline_tag: text-to-video" in card
    assert "num_inference_steps=3, guidance_scale=1.0" in card and "1, 0.757, 0.522, 0" in card
    assert "sha256: unknown" not in card and "| student_3step/accuracy |" not in card  # the tiny run has no digit metrics
    critic = (export.parent / "critic" / "README.md").read_text()  # the critic: the Euler ODE with guidance
    assert "by Euler steps" in critic and "guidance_scale=" in critic and "ManualSigmas" not in critic
    assert "guidance_scale=1.0" not in critic and not (export.parent / "critic" / "comfyui_workflow.json").exists()


def test_the_export_command_copies_the_parts_and_refuses_a_folder_without_them(exports, pipeline_folder, tmp_path,
                                                                              capsys):
    from distill.export import main

    run = exports[3].parent.parent
    assert main([str(run), "--out", str(tmp_path / "copy"), "--parts", "copy"]) == 0
    assert (tmp_path / "copy" / "student" / "vae").is_dir() and not (tmp_path / "copy" / "student" / "vae").is_symlink()
    # the same run, its model folder without a text encoder: one line naming the part
    broken = tmp_path / "broken-run"
    shutil.copytree(run, broken, symlinks=True, ignore=shutil.ignore_patterns("export"))
    model = tmp_path / "model"
    shutil.copytree(pipeline_folder, model, ignore=shutil.ignore_patterns("text_encoder"))
    for checkpoint in broken.glob("checkpoint-*"):
        config = checkpoint / "config.yaml"
        config.write_text(config.read_text().replace(str(pipeline_folder), str(model)))
    capsys.readouterr()
    assert main([str(broken)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {model} has no text_encoder/: WanPipeline needs it (model.path={model})"]
    assert not (broken / "export").exists()  # refused before anything was written


def test_the_single_file_student_is_the_original_layout_and_loads_back_bit_for_bit(exports, tmp_path):
    """--single-file: Wan's original keys (ComfyUI tells Wan by head.modulation), one file a
    network; diffusers' from_single_file reads it back to the exported transformer exactly."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from distill.export import main

    for name, networks in ((3, ["transformer"]), ("pair", ["transformer", "transformer_2"])):
        out = tmp_path / str(name)
        assert main([str(exports[name].parent.parent), "--out", str(out), "--single-file"]) == 0
        for sub in networks:
            path = out / "student" / "single_file" / f"{sub}.safetensors"
            original = load_file(path)
            assert "head.modulation" in original and "blocks.0.self_attn.q.weight" in original
            assert "blocks.0.norm3.weight" in original and "blocks.1.ffn.2.bias" in original
            assert not any(k.startswith(("condition_embedder", "proj_out")) or ".attn1." in k for k in original)
            loaded = WanTransformer3DModel.from_single_file(str(path), config=str(out / "student"), subfolder=sub)
            want = WanTransformer3DModel.from_pretrained(out / "student", subfolder=sub).state_dict()
            got = loaded.state_dict()
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_the_comfyui_workflow_holds_the_students_sigmas_sampler_and_guidance(exports):
    for name, sigmas in ((3, "1, 0.757, 0.522, 0"), (4, "1, 0.9375, 0.833333, 0.625, 0")):
        nodes = json.loads((exports[name] / "comfyui_workflow.json").read_text())
        by_class = {node["class_type"]: node["inputs"] for node in nodes.values()}
        assert by_class["ManualSigmas"]["sigmas"] == sigmas
        assert by_class["KSamplerSelect"]["sampler_name"] == "lcm" and by_class["CFGGuider"]["cfg"] == 1.0
        assert by_class["UNETLoader"]["unet_name"] == "transformer.safetensors"
        latent = by_class["EmptyHunyuanLatentVideo"]
        assert (latent["width"], latent["height"], latent["length"]) == (128, 128, 9)
        sampler = by_class["SamplerCustomAdvanced"]
        for port, cls in (("sigmas", "ManualSigmas"), ("sampler", "KSamplerSelect"), ("guider", "CFGGuider")):
            assert nodes[sampler[port][0]]["class_type"] == cls  # wired to the nodes above
    assert not (exports["pair"] / "comfyui_workflow.json").exists()  # two experts: none written


def test_two_experts_export_both_networks_and_the_boundary(exports):
    index = json.loads((exports["pair"] / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == 0.9
    assert index["transformer"] == index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]


def test_a_list_no_config_holds_gets_the_override_that_samples_it(exports, tmp_path, capsys):
    """[1, 0.9, 0.3, 0.2]: the export says so, the card's lines set the sigmas, and the
    stock pipeline then samples what distill.sample does."""
    from diffusers import WanPipeline

    from distill.export import main

    export = exports["uneven"]
    capsys.readouterr()
    assert main([str(export.parent.parent), "--out", str(tmp_path / "again")]) == 0
    assert "are not representable by a stock scheduler config; README.md gives the lines" in capsys.readouterr().err
    card = (export / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    override = [line for line in code.splitlines() if "partial" in line or "FlowMatchEulerDiscreteScheduler(" in line]
    assert len(override) == 3 and "sigmas=[1, 0.9, 0.3, 0.2]" in override[-1]
    pipe = WanPipeline.from_pretrained(export)
    exec("\n".join(override), {"pipe": pipe})
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"][0].item()), with_kwargs=True)
    torch.manual_seed(3)
    stock = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=8, output_type="latent",
                 **PIXELS).frames
    assert seen == pytest.approx([1000, 900, 300, 200], abs=1e-2)
    assert torch.allclose(stock, sample_ours(export, 3, tmp_path), atol=1e-5)


def test_shift_and_terminal_fit_the_published_lists():
    """The two-parameter warp of set_timesteps' even grid, by hand for the 3-step list:
    shift_terminal is the last sigma, the shift puts the middle one in place."""
    three = fit([1.0, 0.757, 0.522])
    assert three["shift_terminal"] == 0.522 and three["shift"] == pytest.approx(0.967047, abs=1e-6)
    four = fit([1.0, 0.9375, 5 / 6, 0.625])  # 1, .75, .5, .25 warped by shift 5
    assert four["shift_terminal"] == 0.625 and four["shift"] == pytest.approx(2.509456, abs=1e-5)
    assert stretched_sigmas(4, four["shift"], 0.625) == pytest.approx([1.0, 0.9375, 5 / 6, 0.625], abs=1e-6)
    # even sigmas need no warp; a list not starting at 1, or unevenly warped, is not representable
    assert fit([1.0, 0.75, 0.5, 0.25]) == {"shift": pytest.approx(1.0), "shift_terminal": 0.25}
    assert fit([0.9, 0.5]) is None and fit([1.0, 0.9, 0.3, 0.2]) is None and fit([1.0, 0.5, 0.6]) is None


@pytest.fixture(scope="module", params=["ti2v_5b", "i2v_14b"])
def i2v_export(request, built_once, tmp_path_factory):
    """A 2-iteration image-to-video student of each Wan I2V layout, on the tiny family
    folders and datasets that tests/test_image_to_video.py builds (shared, built once)."""
    import functools

    from test_image_to_video import FAMILIES, write_family

    from distill.run import train

    fam = FAMILIES[request.param]
    root = built_once(f"i2v-{fam.name}", functools.partial(write_family, fam))
    run = tmp_path_factory.mktemp(f"stock-{fam.name}")
    train(validate(compose_config([
        f"model.path={root / 'model'}", f"model.latent_shape={fam.latent}".replace(" ", ""),
        f"model.image_condition={fam.condition}", "model.vae=wan", "model.text_encoder=family", "data=parquet",
        f"data.path={root / 'data'}", "method.rollout=data", "method.student_steps=[1000,500]", "data.batch_size=2",
        "training.max_steps=2", "validation.num_samples=1"])), run)
    return fam, root / "model", run / "export" / "student"


def test_image_to_video_students_load_and_run_in_the_stock_pipeline(i2v_export):
    """WanImageToVideoPipeline.from_pretrained(EXPORT) alone: TI2V-5B's expand_timesteps (the
    image's tokens at timestep 0, its latent kept as the first frame), I2V-14B's CLIP encoder
    linked; the transformer runs at the student's timesteps."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    fam, model, export = i2v_export
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["expand_timesteps"] == (fam.condition == "first_frame")
    assert (export / "image_encoder").is_symlink() == fam.clip and (index["image_encoder"][0] is not None) == fam.clip
    pipe = WanImageToVideoPipeline.from_pretrained(export)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].max().item()),
                                               with_kwargs=True)
    image = Image.fromarray(torch.randint(0, 255, (64, 64, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    torch.manual_seed(0)
    latents = pipe(image=image, prompt=PROMPT, height=64, width=64, num_frames=5, num_inference_steps=2,
                   guidance_scale=1.0, max_sequence_length=8, output_type="latent").frames
    assert seen == pytest.approx([1000.0, 500.0], abs=1e-2)
    assert latents.shape[1:] == tuple(fam.latent) and torch.isfinite(latents).all()
