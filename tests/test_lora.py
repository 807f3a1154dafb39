"""LoRA on trainable roles: what trains, FSDP2 and resume, export to diffusers."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose_config, read_metrics, run_launch, train_here, write_tiny_pipeline_parts
from distill.config import validate

LORA = ["roles.student.lora.rank=4", "roles.critic.lora.rank=4"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One trained LoRA run from a saved base model (student with EMA), shared by the
    tests below: (config, trainer, run folder, base folder)."""
    from distill.models import build_adapter
    from distill.run import train

    base = tmp_path_factory.mktemp("base")
    config = validate(compose_config())
    build_adapter(config.model).load(None, seed=123).save_pretrained(base / "transformer")
    write_tiny_pipeline_parts(base)
    run = tmp_path_factory.mktemp("lora-run")
    config = validate(compose_config([
        *LORA, f"model.path={base}", "model.vae=wan", "model.text_encoder=family",  # the whole tiny pipeline
        "roles.student.lora.alpha=8",  # scale alpha / rank = 2: a file that drops alpha shows
        "training.max_steps=6", "method.generator_update_interval=2",
        "method.generator_lr=1e-2", "method.critic_lr=1e-2", "roles.student.ema_decay=0.5",
        # no test reads its samples: 2 prompts, no seeds for diversity (through the tiny VAE,
        # the default 16 and 4 took 60 of the fixture's 87 s)
        "validation.num_samples=2", "validation.health.diversity_seeds=0",
    ]))
    return config, train(config, run), run, base


def test_only_adapters_train(lora_run):
    config, trainer, _, _ = lora_run
    for name in ("student", "critic"):
        role = trainer.roles[name]
        trained = {n for n, p in role.module.named_parameters() if p.requires_grad}
        assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
        in_optimizer = {id(p) for group in role.optimizer.param_groups for p in group["params"]}
        assert in_optimizer == {id(p) for p in role.module.parameters() if p.requires_grad}
        # Wan's attention and FFN projections of every block are adapted
        targets = {n.split(".lora_")[0] for n in trained}
        assert "blocks.1.attn2.to_k" in targets and "blocks.0.ffn.net.2" in targets
        assert len(targets) == 2 * (4 * 2 + 2)  # blocks x (q, k, v, out of two attentions + 2 FFN)
        b = dict(role.module.named_parameters())["blocks.0.attn1.to_q.lora_B.default.weight"]
        assert b.abs().sum() > 0  # B starts at zero: training moved it
    base = trainer.roles["teacher"].module.state_dict()
    student = trainer.roles["student"].module.state_dict()
    assert torch.equal(student["blocks.0.attn1.to_q.base_layer.weight"], base["blocks.0.attn1.to_q.weight"])


def test_checkpoint_holds_only_the_adapters(lora_run):
    _, _, run, _ = lora_run
    state = load_file(next((run / "checkpoint-6" / "state").glob("*.safetensors")))
    weights = [k for k in state if k.startswith("role.student/model/")]
    assert weights and all(".lora_" in k for k in weights)


def test_merged_transformer_is_base_plus_scaled_product(lora_run):
    from diffusers import WanTransformer3DModel

    _, trainer, run, base = lora_run
    merged = WanTransformer3DModel.from_pretrained(run / "export" / "student", subfolder="transformer").state_dict()
    original = WanTransformer3DModel.from_pretrained(base, subfolder="transformer").state_dict()
    trained = dict(trainer.roles["student"].module.named_parameters())
    prefix = "blocks.1.attn1.to_v"
    a, b = trained[f"{prefix}.lora_A.default.weight"], trained[f"{prefix}.lora_B.default.weight"]
    scale = 8 / 4  # alpha / rank
    assert torch.allclose(merged[f"{prefix}.weight"], original[f"{prefix}.weight"] + scale * b @ a, atol=1e-6)
    assert torch.equal(merged["patch_embedding.weight"], original["patch_embedding.weight"])  # not adapted
    assert not any("lora" in k for k in merged)


def test_exported_lora_loads_into_a_wan_pipeline_and_matches_the_student(lora_run):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    config, trainer, run, base = lora_run
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(base / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(base / "text_encoder"),
        transformer=WanTransformer3DModel.from_pretrained(base, subfolder="transformer"),
        vae=AutoencoderKLWan.from_pretrained(base, subfolder="vae"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.model.shift),
    )
    pipe.load_lora_weights(run / "export" / "student" / "lora")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *config.model.latent_shape), generator=g)
    text = torch.randn((2, config.model.text_len, config.model.text_dim), generator=g)
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        want = trainer.roles["student"].module(x, t, text, return_dict=False)[0]
        got = pipe.transformer(x, t, text, return_dict=False)[0]
        untrained = WanTransformer3DModel.from_pretrained(base, subfolder="transformer")(x, t, text, return_dict=False)[0]
    assert torch.allclose(want, got, atol=1e-5)
    assert not torch.allclose(want, untrained, atol=1e-3)  # the adapters matter
    # the whole pipeline runs with the adapters loaded (prompt -> umT5 -> transformer -> latents)
    latents = pipe(prompt="a red square moves left", height=16, width=16, num_frames=9, num_inference_steps=2,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(latents).all()


def test_the_comfyui_lora_file_has_original_keys_and_loads_in_diffusers_as_the_merged_student(lora_run):
    """lora/comfyui_lora.safetensors: ComfyUI's Wan names (lora_down / lora_up / alpha under
    diffusion_model.<original module>), read by WanPipeline.load_lora_weights with alpha applied."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    config, _, run, base = lora_run
    folder = run / "export" / "student"
    comfy = load_file(folder / "lora" / "comfyui_lora.safetensors")
    assert comfy["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 8.0
    for key in ("blocks.0.self_attn.q.lora_down.weight", "blocks.1.cross_attn.o.lora_up.weight",
                "blocks.0.ffn.0.lora_down.weight", "blocks.1.ffn.2.lora_up.weight"):
        assert f"diffusion_model.{key}" in comfy, key
    assert all(k.startswith("diffusion_model.blocks.") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in comfy)
    assert len(comfy) == 3 * 2 * (4 * 2 + 2)  # down, up, alpha x blocks x adapted modules
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=WanTransformer3DModel.from_pretrained(base, subfolder="transformer"))
    pipe.load_lora_weights(str(folder / "lora"), weight_name="comfyui_lora.safetensors")
    merged = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *config.model.latent_shape), generator=g)
    text = torch.randn((2, config.model.text_len, config.model.text_dim), generator=g)
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        want, got = merged(x, t, text, return_dict=False)[0], pipe.transformer(x, t, text, return_dict=False)[0]
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()


def test_sample_command_reads_the_merged_and_the_lora_export_alike(lora_run, tmp_path):
    _, _, run, _ = lora_run
    outputs = {}
    for extra in ([], ["--lora"]):
        out = tmp_path / f"samples{len(extra)}.safetensors"
        result = subprocess.run(
            [sys.executable, "-m", "distill.sample", str(run / "export" / "student"), "--out", str(out),
             "--prompt", "a red square moves left", "--seeds", "0", "1", *extra],
            cwd=ROOT, capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
        assert "2 samples in 3 steps" in result.stdout
        outputs[len(extra)] = load_file(out)["samples"]
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)


def test_ema_of_the_adapters_is_exported(lora_run):
    _, trainer, run, _ = lora_run
    ema = trainer.roles["student"].ema.state_dict()
    assert set(ema) == {n for n, p in trainer.roles["student"].module.named_parameters() if p.requires_grad}
    lora = load_file(run / "export" / "student_ema" / "lora" / "pytorch_lora_weights.safetensors")
    key = "transformer.blocks.0.attn1.to_q.lora_B.weight"
    assert torch.equal(lora[key], ema["blocks.0.attn1.to_q.lora_B.default.weight"])


@pytest.mark.multiprocess
def test_two_rank_lora_matches_one_rank_and_resumes_bit_identically(tmp_path):
    """FSDP2 shards the adapters with their blocks: 2 ranks x batch 2 equal 1 rank x
    batch 4 within 1e-5; 3 steps, then a relaunch to 6, equal 6 straight bit for bit."""
    common = [*LORA, "method.generator_update_interval=2", "method.generator_lr=1e-2", "method.critic_lr=1e-2"]
    one, straight, resumed = tmp_path / "one", tmp_path / "straight", tmp_path / "resumed"
    two = [*common, "data.batch_size=2", "launcher.nproc_per_node=2"]
    train_here([*common, "data.batch_size=4", "training.max_steps=6", f"hydra.run.dir={one}"])
    runs = [
        [*two, "training.max_steps=6", f"hydra.run.dir={straight}"],
        [*two, "training.max_steps=3", f"hydra.run.dir={resumed}"],
        [*two, "training.max_steps=6", f"hydra.run.dir={resumed}"],
    ]
    for args in runs:
        result = run_launch(args)
        assert result.returncode == 0, result.stderr
    assert "resumed from" in (resumed / "launch.log").read_text()
    lora = {r: load_file(r / "export" / "student" / "lora" / "pytorch_lora_weights.safetensors")
            for r in (one, straight, resumed)}
    assert lora[one].keys() == lora[straight].keys()
    for key in lora[one]:
        assert torch.allclose(lora[one][key], lora[straight][key], rtol=0, atol=1e-5), key
        assert torch.equal(lora[straight][key], lora[resumed][key]), key
    a, b = read_metrics(one), read_metrics(straight)
    for x, y in zip(a, b):
        assert abs(x["loss/critic"] - y["loss/critic"]) <= 1e-5 * abs(x["loss/critic"])


def test_frozen_role_loads_at_bf16_keeping_diffusers_fp32_modules(tiny_model_dir, caplog):
    import warnings

    from distill.config.schema import Precision, RoleConfig
    from distill.distributed import Runtime
    from distill.models import build_adapter
    from distill.roles import build_module

    config = validate(compose_config([f"model.path={tiny_model_dir}"]))
    adapter = build_adapter(config.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("WARNING"):
            module = build_module(RoleConfig(precision=Precision.bf16), str(tiny_model_dir), 0, adapter, Runtime())
    assert not [r for r in caplog.records if "dtype" in r.getMessage() or "cast" in r.getMessage()]
    dtypes = {n: p.dtype for n, p in module.named_parameters()}
    keep = module._keep_in_fp32_modules
    assert dtypes["scale_shift_table"] == torch.float32 and dtypes["blocks.0.norm2.weight"] == torch.float32
    assert all(d == torch.float32 for n, d in dtypes.items() if set(n.split(".")) & set(keep))
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16 and dtypes["patch_embedding.weight"] == torch.bfloat16
    x = torch.randn((1, *config.model.latent_shape))
    text = torch.randn((1, config.model.text_len, config.model.text_dim))
    out = adapter.forward(module, x, torch.tensor([500.0]), text)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    # the arch-built path (no folder) casts the same way
    built = build_module(RoleConfig(precision=Precision.bf16), None, 0, adapter, Runtime())
    assert {n: p.dtype for n, p in built.named_parameters()} == dtypes


def test_lora_config_is_checked():
    from distill.config import ConfigError

    for overrides, message in [
        (["roles.student.lora.rank=4", "roles.student.lora.dropout=1.0"], "roles.student.lora.dropout=1.0: must be in [0, 1)"),
        (["roles.student.lora.rank=4", "roles.student.lora.alpha=0"], "roles.student.lora.alpha=0.0: must be > 0"),
        (["roles.student.lora.rank=4", "roles.student.lora.target_modules=[]"], "roles.student.lora.target_modules=[]"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(compose_config(overrides))
        assert message in str(err.value)


@pytest.mark.multiprocess
def test_critic_lora_over_the_teachers_network_equals_its_own_copy(tmp_path):
    """roles.critic.lora.base_role=teacher: one network, the teacher running it with the
    adapters off. On 2 ranks it trains exactly like a critic with its own copy of the
    same base weights, and the teacher's predictions never change."""
    shared, own = tmp_path / "shared", tmp_path / "own"
    common = ["roles.critic.lora.rank=4", "training.max_steps=4", "method.generator_update_interval=2",
              "method.critic_lr=1e-2", "launcher.nproc_per_node=2", "data.batch_size=1"]
    for args in ([*common, "roles.critic.lora.base_role=teacher", f"hydra.run.dir={shared}"],
                 [*common, f"hydra.run.dir={own}"]):
        result = run_launch(args)
        assert result.returncode == 0, result.stderr
    assert "LoRA rank 4 on teacher's network" in (shared / "launch.log").read_text()
    for x, y in zip(read_metrics(shared), read_metrics(own)):
        for key in ("loss/critic", "loss/student", "grad_norm/critic"):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-6 * max(1.0, abs(x[key])), (x["step"], key)
    a = load_file(shared / "export" / "critic" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(own / "export" / "critic" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_shared_network_runs_the_teacher_without_the_adapters(tmp_path):
    from distill.run import build_trainer

    config = validate(compose_config(["roles.critic.lora.rank=4", "roles.critic.lora.base_role=teacher",
                                      "method.critic_lr=1e-1", "logger.progress_bar=false"]))
    trainer = build_trainer(config, tmp_path)
    teacher, critic = trainer.roles["teacher"], trainer.roles["critic"]
    assert teacher.module is critic.module
    adapter = trainer.method.adapter
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, *config.model.latent_shape), generator=g)
    text = torch.randn((1, config.model.text_len, config.model.text_dim), generator=g)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        before = adapter.predict_velocity(teacher, x, sigma, text)
    for _ in range(3):
        trainer.advance()
    with torch.no_grad():
        after_teacher = adapter.predict_velocity(teacher, x, sigma, text)
        after_critic = adapter.predict_velocity(critic, x, sigma, text)
    assert torch.equal(before, after_teacher)
    assert not torch.allclose(after_critic, after_teacher, atol=1e-4)
    assert [n for n, r in trainer.checkpointer.parts.items()] == ["role.student", "role.critic", "trainer", "data", "method", "rng"]


@pytest.mark.parametrize("overrides,message", [
    (["roles.critic.lora.base_role=teacher"], "roles.critic.lora.base_role=teacher: needs roles.critic.lora.rank > 0"),
    (["roles.critic.lora.rank=4", "roles.critic.lora.base_role=nobody"], "roles.critic.lora.base_role=nobody: no such role"),
    (["roles.critic.lora.rank=4", "roles.critic.lora.base_role=student"], "the base role must be frozen"),
    (["roles.critic.lora.rank=4", "roles.critic.lora.base_role=teacher", "roles.critic.precision=bf16"],
     "roles.critic.precision=bf16 must equal roles.teacher.precision=fp32"),
])
def test_shared_base_is_checked(overrides, message):
    from distill.config import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in str(err.value)


def test_sample_by_prompt_encodes_with_umt5_and_decodes_to_mp4(lora_run, tmp_path):
    """A Wan export: prompts through the pipeline folder's umT5, latents through its VAE, out as H.264."""
    import av

    from distill.models.wan import WanEncoders
    from distill.sample import main

    _, _, run, base = lora_run
    out, latents = tmp_path / "clip.mp4", tmp_path / "latents.safetensors"
    prompts = ["a red square moves left", "a blue square moves right"]
    args = [str(run / "export" / "student"), "--prompt", prompts[0], "--prompt", prompts[1], "--out", str(out)]
    assert main([*args, "--latents", str(latents)]) == 0
    encoded = WanEncoders(base, text_only=True, max_text_len=8, device=torch.device("cpu")).text(prompts)
    text = load_file(latents)["text_embeds"]
    for i, want in enumerate(encoded):
        assert torch.allclose(text[i, : len(want)], want) and not text[i, len(want):].any()
    with av.open(str(out)) as video:
        stream = video.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(stream)]
        assert stream.codec_context.name == "h264"
    assert len(frames) == 9  # 3 latent frames through the Wan VAE: 1 + 2 * 4
    height, width, _ = frames[0].shape
    assert width > height and width % 2 == 0 and height % 2 == 0  # two captioned clips side by side
