"""The Wan2.1 recipes hold the published numbers (design.md section 4 and the
sources each experiment file cites), in this project's conventions."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, read_metrics, run_launch
from distill.config import validate

# published numbers; CFG already in the uncond + w * (cond - uncond) form
RECIPES = {
    "wan21_t2v_1.3b_dmd2_3step": dict(
        sigmas=[1.0, 0.757, 0.522], shift=8.0, guidance=4.5, rollout="data", lr=(2e-6, 2e-6),
        betas=([0.9, 0.999], [0.9, 0.999]), interval=5, clamp=(0.02, 0.98), ema=None, global_batch=64,
        latent_shape=[16, 21, 60, 104], teacher="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ),
    "wan21_t2v_1.3b_dmd2_4step": dict(
        sigmas=[1.0, 0.75, 0.5, 0.25], shift=8.0, guidance=4.5, rollout="simulate", lr=(2e-6, 8e-6),
        betas=([0.0, 0.999], [0.0, 0.999]), interval=5, clamp=(0.0, 1.0), ema=(0.98, "iteration", 1), global_batch=4,
        latent_shape=[16, 20, 56, 104], teacher="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ),
    "wan21_t2v_1.3b_dmd2_8step_14b_teacher": dict(
        sigmas=[1.0, 0.85, 0.7, 0.55, 0.35, 0.275, 0.2, 0.125], shift=8.0, guidance=4.5, rollout="simulate",
        lr=(2e-6, 8e-6), betas=([0.0, 0.999], [0.0, 0.999]), interval=5, clamp=(0.0, 1.0), ema=None,
        global_batch=None, latent_shape=[16, 20, 56, 104], teacher="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    ),
}


def composed(name, tmp_path):
    return OmegaConf.to_object(compose_config([f"experiment={name}", f"data.path={tmp_path}"]))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_holds_the_published_numbers(name, tmp_path):
    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter

    want, config = RECIPES[name], composed(name, tmp_path)
    method, student, critic = config.method, config.roles["student"], config.roles["critic"]
    used = student_sigmas(method, build_adapter(config.model)).tolist()  # what the student really runs
    assert used == pytest.approx(want["sigmas"], abs=1e-6)
    assert (config.model.shift, method.guidance_scale, method.rollout.value) == (want["shift"], want["guidance"], want["rollout"])
    assert (method.generator_lr, method.critic_lr) == want["lr"]
    assert (list(student.optimizer.betas), list(critic.optimizer.betas)) == want["betas"]
    assert (student.optimizer.weight_decay, critic.optimizer.weight_decay) == (0.01, 0.01)
    assert (student.max_grad_norm, critic.max_grad_norm) == (1.0, 1.0)
    assert method.generator_update_interval == want["interval"]
    assert method.critic_sample.value == "fresh"  # faker_score_forward runs the generator again
    assert (method.student_step_draw.value, method.critic_on_generator_iterations) == ("shared", True)
    assert (method.min_timestep_ratio, method.max_timestep_ratio) == want["clamp"]
    ema = None if student.ema_decay is None else (student.ema_decay, student.ema_update.value, student.ema_start_step)
    assert ema == want["ema"] and critic.ema_decay is None
    assert config.training.global_batch_size == want["global_batch"]
    assert list(config.model.latent_shape) == want["latent_shape"]
    assert (config.roles["teacher"].path or config.model.path) == want["teacher"]
    assert config.roles["teacher"].precision.value == "bf16" and student.precision.value == "bf16"


def test_global_batch_of_a_recipe_sets_the_accumulation(tmp_path, tiny_model_dir):
    """64 = 8 ranks x batch 1 x 8 accumulation steps; 3 per rank does not divide it."""
    from distill.config import ConfigError

    tiny = [f"model.path={tiny_model_dir}", "model.text_dim=32"]
    wan = compose_config(["experiment=wan21_t2v_1.3b_dmd2_3step", f"data.path={tmp_path}", "launcher.nproc_per_node=8",
                          "model.latent_shape=[16,3,16,16]", *tiny])
    assert validate(wan).training.grad_accum_steps == 8
    bad = compose_config(["experiment=wan21_t2v_1.3b_dmd2_3step", f"data.path={tmp_path}", "launcher.nproc_per_node=8",
                          "data.batch_size=3", "model.latent_shape=[16,3,16,16]", *tiny])
    with pytest.raises(ConfigError) as err:
        validate(bad)
    assert ("training.global_batch_size=64: 8 data-parallel ranks x data.batch_size=3 = 24 does not divide it"
            in str(err.value))


@pytest.mark.multiprocess
def test_global_batch_equals_explicit_accumulation_on_one_and_two_ranks(tmp_path):
    runs = {
        "explicit": ["data.batch_size=2", "training.grad_accum_steps=2"],
        "global": ["data.batch_size=2", "training.global_batch_size=4"],
        "two_ranks": ["data.batch_size=1", "training.global_batch_size=4", "launcher.nproc_per_node=2"],
    }
    for name, args in runs.items():
        result = run_launch([*args, "training.max_steps=4", "method.generator_update_interval=2",
                             f"hydra.run.dir={tmp_path / name}"])
        assert result.returncode == 0, result.stderr
    explicit, by_global, two = (read_metrics(tmp_path / n) for n in runs)
    keys = ("loss/critic", "loss/student", "grad_norm/critic", "grad_norm/student")
    for a, b, c in zip(explicit, by_global, two):
        for key in keys:
            if key in a:
                assert a[key] == b[key]
                assert abs(a[key] - c[key]) <= 1e-5 * abs(a[key])
    saved = OmegaConf.load(tmp_path / "two_ranks" / "config.yaml")
    assert saved.training.grad_accum_steps == 2  # 4 = 2 ranks x 1 x 2


def test_three_step_export_lists_the_published_sigmas(tmp_path):
    """The 3-step recipe's method on a tiny model: the exported scheduler holds
    sigma = 1.0, 0.757, 0.522, unwarped despite shift 8."""
    from distill.run import train

    tiny = ["model=wan_tiny", "data=synthetic", "training.max_steps=1", "training.global_batch_size=null",
            "roles.student.precision=fp32", "roles.critic.precision=fp32", "roles.teacher.precision=fp32",
            "validation.num_samples=1"]
    cfg = compose_config(["experiment=wan21_t2v_1.3b_dmd2_3step", *tiny, "model.latent_shape=[16,3,16,16]"])
    config = validate(cfg)
    assert config.method.student_steps == [1000, 757, 522] and config.method.rollout.value == "data"
    train(config, tmp_path)
    scheduler = json.loads((tmp_path / "export" / "student" / "scheduler" / "scheduler_config.json").read_text())
    info = json.loads((tmp_path / "export" / "student" / "distill.json").read_text())
    assert info["sampler"]["sigmas"] == pytest.approx([1.0, 0.757, 0.522], abs=1e-6) and info["shift"] == 8.0
    # a stock set_timesteps(3) lands on them: the even grid warped by these two, not the model's shift 8
    assert scheduler["shift"] == pytest.approx(0.967047, abs=1e-6)
    assert scheduler["shift_terminal"] == pytest.approx(0.522, abs=1e-6)


def test_ema_per_iteration_follows_a_hand_computed_sequence():
    """ema_update=iteration: the shadow moves every iteration, also when the role
    did not step; up to ema_start_step it copies the weights."""
    from torch import nn

    from distill.config.schema import EmaUpdate, RoleConfig
    from distill.ema import EMA
    from distill.roles import Role

    module = nn.Linear(1, 1, bias=False)
    cfg = RoleConfig(trainable=True, ema_decay=0.5, ema_start_step=1, ema_update=EmaUpdate.iteration)
    role = Role("student", cfg, module, ema=EMA(module, 0.5, start_step=1))
    shadow = []
    for iteration, weight in enumerate([1.0, 3.0, 3.0, 7.0]):
        with torch.no_grad():
            module.weight.fill_(weight)
        role.end_iteration(iteration)
        shadow.append(float(role.ema.state_dict()["weight"]))
    assert shadow == [1.0, 2.0, 2.5, 4.75]  # copy, then 0.5 * shadow + 0.5 * weight each iteration
    stepwise = Role("student", RoleConfig(trainable=True, ema_decay=0.5), module, ema=EMA(module, 0.5))
    stepwise.end_iteration(0)
    assert float(stepwise.ema.state_dict()["weight"]) == 7.0  # step mode: iterations alone do not move it


def test_fastgen_gan_recipe_holds_its_published_numbers(tmp_path):
    """FastGen's Wan2.1-T2V-1.3B DMD2 + GAN (fastgen/configs/experiments/WanT2V/config_dmd2.py)."""
    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter

    config = composed("wan21_t2v_1.3b_dmd2_gan_4step", tmp_path)
    method, student, critic = config.method, config.roles["student"], config.roles["critic"]
    used = student_sigmas(method, build_adapter(config.model)).tolist()
    assert used == pytest.approx([0.999, 0.937, 0.833, 0.624], abs=1e-6)
    assert (config.model.shift, method.guidance_scale, method.rollout.value) == (5.0, 5.0, "data")
    assert (method.generator_lr, method.critic_lr, method.generator_update_interval) == (1e-5, 1e-5, 5)
    assert (method.min_timestep_ratio, method.max_timestep_ratio) == (0.001, 0.999)
    gan = method.gan
    assert gan.enabled and gan.features == "teacher" and list(gan.blocks) == [15, 22, 29]
    assert (gan.generator_weight, gan.discriminator_weight, gan.r1_weight, gan.trunk_grad) == (0.03, 1.0, 0.0, False)
    assert list(student.optimizer.betas) == [0.9, 0.999] and student.optimizer.weight_decay == 0.01
    assert (student.max_grad_norm, critic.max_grad_norm) == (10.0, None)  # FastGen clips the student only
    assert (config.training.global_batch_size, config.training.max_steps) == (64, 6000)
    assert list(config.model.latent_shape) == [16, 21, 60, 104]
    assert_fastgen_loop(method)


def assert_fastgen_loop(method):
    """FastGen's DMD2: a step per sample, never t = 0; the critic on 4 of 5 iterations; its
    "ode" student sampler."""
    assert (method.student_step_draw.value, method.clean_step) == ("per_sample", False)
    assert (method.critic_on_generator_iterations, method.student_sampler.value) == (False, "deterministic")


def test_self_forcing_recipe_holds_its_published_numbers(tmp_path):
    """Self-Forcing's DMD (configs/self_forcing_dmd.yaml over default_config.yaml)."""
    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter

    config = composed("wan21_t2v_1.3b_self_forcing_dmd_4step", tmp_path)
    assert config.required == {"roles.student.path": "the ODE-init student's export, as Self-Forcing's "
                               "generator_ckpt: experiment=wan21_t2v_1.3b_ode_init_causal at these steps"}
    assert (config.training.max_steps, config.checkpoint.every) == (600, 50)
    method, student, critic = config.method, config.roles["student"], config.roles["critic"]
    used = student_sigmas(method, build_adapter(config.model)).tolist()
    # [1000, 750, 500, 250] warped with shift 5: 5s / (1 + 4s)
    assert used == pytest.approx([1.0, 15 / 16, 5 / 6, 0.625], abs=1e-6)
    assert (method.name, config.model.shift, config.model.chunk_frames, student.causal) == ("self_forcing", 5.0, 3, True)
    assert method.guidance_scale == 3.0 + 1  # their cond + 3 (cond - uncond)
    assert (method.generator_lr, method.critic_lr, method.generator_update_interval) == (2e-6, 4e-7, 5)
    assert (method.min_timestep_ratio, method.max_timestep_ratio) == (0.02, 0.98)
    assert (method.exit_per_chunk, method.context_timestep, method.rollout.value) == (False, 0, "simulate")
    assert (method.critic_sample.value, method.critic_on_generator_iterations) == ("fresh_batch", True)
    assert list(student.optimizer.betas) == list(critic.optimizer.betas) == [0.0, 0.999]
    assert student.optimizer.weight_decay == critic.optimizer.weight_decay == 0.01
    assert (student.max_grad_norm, critic.max_grad_norm) == (10.0, 10.0)
    assert (student.ema_decay, student.ema_start_step) == (0.99, 200)
    assert config.roles["teacher"].path == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert config.data.text_only and config.training.global_batch_size == 64
    assert list(config.model.latent_shape) == [16, 21, 60, 104]


def test_causvid_recipes_hold_their_published_numbers(tmp_path):
    """CausVid's ODE init (configs/wan_causal_ode.yaml, generate_ode_pairs.py) and DMD
    (configs/wan_causal_dmd.yaml)."""
    ode = composed("wan21_t2v_1.3b_ode_init_causal", tmp_path)
    assert (ode.method.name, list(ode.method.student_steps), ode.method.warp_steps) == ("ode_init", [1000, 757, 522], False)
    assert (ode.method.teacher_steps, ode.method.guidance_scale, ode.method.lr) == (50, 6.0, 2e-6)
    assert (ode.model.shift, ode.model.chunk_frames, ode.roles["student"].causal) == (8.0, 3, True)
    assert list(ode.roles["student"].optimizer.betas) == [0.9, 0.999] and ode.data.batch_size == 2
    assert ode.method.clean_step and ode.roles["student"].max_grad_norm == 10.0  # train_ode.py clips at 10
    dmd = composed("wan21_t2v_1.3b_causvid_dmd_3step", tmp_path)
    method, student = dmd.method, dmd.roles["student"]
    assert (method.name, list(method.student_steps), method.warp_steps, method.rollout.value) == (
        "dmd2", [1000, 757, 522], False, "data")
    assert method.guidance_scale == 3.5 + 1 and (method.generator_lr, method.critic_lr) == (2e-6, 2e-6)
    assert (dmd.model.shift, dmd.model.chunk_frames, student.causal, dmd.roles["critic"].causal) == (8.0, 3, True, False)
    assert list(student.optimizer.betas) == [0.9, 0.999] and student.max_grad_norm == 10.0
    assert (method.student_step_draw.value, method.clean_step, method.critic_sample.value) == ("per_chunk", True, "fresh")
    assert method.critic_on_generator_iterations and list(dmd.required) == ["roles.student.path"]


def test_fastgen_self_forcing_14b_recipe_holds_its_published_numbers(tmp_path):
    """FastGen's Self-Forcing on Wan2.1-T2V-14B (WanT2V/config_sf_14b.py)."""
    config = composed("wan21_t2v_14b_self_forcing_dmd_gan_4step", tmp_path)
    method, student = config.method, config.roles["student"]
    assert (method.name, list(method.student_steps), method.warp_steps) == ("self_forcing", [999, 937, 833, 624], False)
    assert (config.model.path, config.model.shift, config.model.chunk_frames) == ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 5.0, 3)
    assert (method.guidance_scale, method.generator_lr, method.critic_lr) == (5.0, 5e-6, 5e-6)
    assert (method.min_timestep_ratio, method.max_timestep_ratio, method.exit_per_chunk) == (0.001, 0.999, False)
    gan = method.gan
    assert gan.enabled and gan.features == "teacher" and list(gan.blocks) == [21, 30, 39]
    assert gan.generator_weight == 0.003 and config.roles["teacher"].activation_checkpointing == "full"
    assert student.causal and list(student.optimizer.betas) == [0.9, 0.999] and config.training.max_steps == 5000
    assert (method.critic_on_generator_iterations, student.max_grad_norm, config.roles["critic"].max_grad_norm) == (
        False, 10.0, None)
    assert list(config.required) == ["roles.student.path"]  # FastGen: pretrain the causal student first
    planned = validate(compose_config(["experiment=wan21_t2v_14b_self_forcing_dmd_gan_4step", "plan=true"]))
    from distill.models import build_adapter
    from distill.plan import layout_of, make_plan

    plan = make_plan(planned, build_adapter(planned.model), layout_of(planned), 80)
    assert plan.peak / 2**30 == pytest.approx(66.0, abs=0.1)  # fits 80 GB: no critic graph beside the student's


def test_ti2v_5b_i2v_recipe_holds_fastgens_numbers_and_fits_one_node(tmp_path):
    """FastGen's Wan2.2-5B I2V DMD2 (fastgen/configs/experiments/WanI2V/config_dmd2_wan22_5b.py),
    at 4 steps with FastVideo's warped schedule; the plan fits 8 x 80 GB."""
    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter
    from distill.plan import Layout, make_plan

    config = composed("wan22_ti2v_5b_i2v_dmd2_4step", tmp_path)
    method, model = config.method, config.model
    adapter = build_adapter(model)
    # [1000, 750, 500, 250] / 1000 shifted by 5: 5s / (1 + 4s)
    assert student_sigmas(method, adapter).tolist() == pytest.approx([1.0, 15 / 16, 5 / 6, 0.625], abs=1e-6)
    assert (model.path, model.shift, model.image_condition.value) == ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 5.0,
                                                                      "first_frame")
    assert list(model.latent_shape) == [48, 21, 44, 80] and len(model.latents_mean) == len(model.latents_std) == 48
    assert (method.guidance_scale, method.generator_lr, method.critic_lr) == (5.0, 1e-5, 1e-5)
    assert (method.min_timestep_ratio, method.max_timestep_ratio) == (0.001, 0.999)
    assert list(method.gan.blocks) == [15, 22, 29] and method.gan.generator_weight == 0.03
    assert config.data.batch_size == 2
    assert_fastgen_loop(method)
    assert (config.roles["student"].max_grad_norm, config.roles["critic"].max_grad_norm) == (10.0, None)
    planned = validate(compose_config(["experiment=wan22_ti2v_5b_i2v_dmd2_4step", "plan=true"]))
    plan = make_plan(planned, build_adapter(planned.model), Layout(8, 1, 1), 80)  # 1 node x 8 GPUs
    assert plan.tokens == 21 * 22 * 40
    assert plan.peak / 2**30 == pytest.approx(49.25, abs=0.1) and plan.peak / 2**30 < 72


def test_i2v_14b_recipes_hold_fastgens_numbers_and_fit(tmp_path):
    """FastGen's Wan2.1-I2V-14B-480P DMD2 (fastgen/configs/experiments/WanI2V/config_dmd2_14b.py)
    at 4 steps; the 720P recipe is the 480P one at 720P's shapes and shift."""
    from distill.models import build_adapter
    from distill.plan import layout_of, make_plan

    for name, shape, shift, nodes, context in (("wan21_i2v_14b_480p_dmd2_4step", [16, 21, 60, 104], 3.0, 2, 4),
                                               ("wan21_i2v_14b_720p_dmd2_4step", [16, 21, 90, 160], 5.0, 4, 8)):
        config = composed(name, tmp_path)
        method, model = config.method, config.model
        assert (model.image_condition.value, model.shift, list(model.latent_shape)) == ("concat", shift, shape)
        assert (method.guidance_scale, method.generator_lr, method.critic_lr) == (5.0, 1e-5, 1e-5)
        assert list(method.gan.blocks) == [21, 30, 39] and method.gan.generator_weight == 0.03
        assert (config.launcher.nodes, config.parallel.context) == (nodes, context)
        assert_fastgen_loop(method)
        planned = validate(compose_config([f"experiment={name}", "plan=true"]))
        assert make_plan(planned, build_adapter(planned.model), layout_of(planned), 80).peak / 2**30 < 72


def test_a14b_recipe_routes_its_steps_to_both_experts_and_fits(tmp_path):
    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter
    from distill.plan import layout_of, make_plan

    config = composed("wan22_t2v_a14b_dmd2_4step", tmp_path)
    model = config.model
    assert (model.path, model.boundary_ratio, model.shift) == ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", 0.875, 12.0)
    assert (config.method.guidance_scale, model.low_noise_guidance_scale) == (4.0, 3.0)
    sigmas = student_sigmas(config.method, build_adapter(model)).tolist()
    # [1000, 750, 500, 250] shifted by 12: 12s / (1 + 11s)
    assert sigmas == pytest.approx([1.0, 9 / 9.25, 6 / 6.5, 3 / 3.75], abs=1e-6)
    assert [1000 * s >= 875 for s in sigmas] == [True, True, True, False]
    planned = validate(compose_config(["experiment=wan22_t2v_a14b_dmd2_4step", "plan=true"]))
    plan = make_plan(planned, build_adapter(planned.model), layout_of(planned), 80)
    assert plan.peak / 2**30 == pytest.approx(48.1, abs=0.1)


def test_qwen_image_recipe_holds_fastgens_numbers_and_fits_two_nodes(tmp_path):
    """FastGen's Qwen-Image DMD2 (fastgen/configs/experiments/QwenImage/config_dmd2.py): 512x512,
    linspace(0.999, 0, 5) student steps, unshifted score timesteps; the plan fits 2 x 8 x 80 GB,
    and the 1328x1328 preset carries the pipeline's shift for its size."""
    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter
    from distill.plan import Layout, make_plan

    config = composed("qwen_image_dmd2_4step", tmp_path)
    method, model = config.method, config.model
    adapter = build_adapter(model)
    assert (model.path, list(model.latent_shape), model.dynamic_shift, adapter.shift) == (
        "Qwen/Qwen-Image", [16, 1, 64, 64], False, 1.0)
    assert student_sigmas(method, adapter).tolist() == pytest.approx([0.999, 0.749, 0.5, 0.25], abs=1e-6)
    assert (method.guidance_scale, method.generator_lr, method.critic_lr) == (4.0, 1e-5, 1e-5)
    assert (method.min_timestep_ratio, method.max_timestep_ratio) == (0.001, 0.999)
    assert (list(method.gan.blocks), method.gan.generator_weight, method.gan.features) == ([30], 0.03, "teacher")
    assert (config.data.batch_size, config.training.max_steps, config.checkpoint.every) == (2, 5000, 500)
    assert_fastgen_loop(method)
    planned = validate(compose_config(["experiment=qwen_image_dmd2_4step", "plan=true"]))
    plan = make_plan(planned, build_adapter(planned.model), Layout(16, 1, 1), 80)
    assert plan.tokens == 32 * 32 + 512  # packed image tokens and the padded prompt
    assert plan.peak / 2**30 == pytest.approx(39.06, abs=0.1) and plan.peak / 2**30 < 72
    preset = build_adapter(validate(compose_config(["model=qwen_image", "plan=true"])).model)
    assert preset.shift == pytest.approx(2.3033, abs=1e-4)  # exp(mu) at 6,889 tokens


def test_ltx2_recipe_samples_at_the_distilled_sigmas_and_fits_two_nodes(tmp_path):
    """The official distilled LTX-2's 8 sigmas (its public constants), the pipeline's CFG per
    stream (3.0 video, 7.0 audio); the plan fits 2 x 8 x 80 GB."""
    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter
    from distill.plan import Layout, make_plan

    config = composed("ltx2_dmd2_8step", tmp_path)
    method, model = config.method, config.model
    adapter = build_adapter(model)
    assert student_sigmas(method, adapter).tolist() == pytest.approx(
        [1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875], abs=1e-6)
    assert (model.path, list(model.latent_shape), list(model.audio_shape)) == (
        "Lightricks/LTX-2", [128, 16, 16, 24], [8, 126, 16])
    assert (method.guidance_scale, model.audio_guidance_scale, model.text_dim) == (3.0, 7.0, 7680)
    planned = validate(compose_config(["experiment=ltx2_dmd2_8step", "plan=true"]))
    plan = make_plan(planned, build_adapter(planned.model), Layout(16, 1, 1), 80)
    assert plan.tokens == 16 * 16 * 24
    assert plan.peak / 2**30 < 72


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_rcm_recipes_hold_the_release_numbers(steps, tmp_path):
    """rCM's Wan2.1-T2V-1.3B (NVlabs/rcm at 5b41aa9: rcm/configs/experiments/rcm/wan2pt1_t2v.py,
    rcm/inference/wan2pt1_t2v_rcm_infer.py): TrigFlow times atan(80), 1.5, 1.4, 1.0, the first
    `steps` of them, as the flow sigmas tan t / (1 + tan t)."""
    import math

    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter

    config = composed(f"wan21_t2v_1.3b_rcm_{steps}step", tmp_path)
    method, student, critic = config.method, config.roles["student"], config.roles["critic"]
    times = [math.atan(80), 1.5, 1.4, 1.0][:steps]
    used = student_sigmas(method, build_adapter(config.model)).tolist()
    assert used == pytest.approx([math.tan(t) / (1 + math.tan(t)) for t in times], abs=1e-6)
    assert (method.name, config.model.shift, method.guidance_scale, method.rollout.value) == ("rcm", 5.0, 5.0, "simulate")
    assert (method.generator_lr, method.critic_lr, method.generator_update_interval) == (2e-6, 4e-7, 5)
    assert (method.consistency_weight, method.dmd_weight, method.adaptive_weighting) == (100.0, 2.0, False)
    assert (method.time_mean, method.time_std, method.tangent_warmup, method.tangent_norm) == (0.7, 1.6, 1000, 0.1)
    assert method.warmup_form.value == "rcm" and not method.critic_on_generator_iterations
    assert (method.min_timestep_ratio, method.max_timestep_ratio) == (0.0, 1.0)
    for role in (student, critic):
        assert (list(role.optimizer.betas), role.optimizer.weight_decay, role.max_grad_norm) == ([0.0, 0.999], 0.01, None)
    assert list(config.model.latent_shape) == [16, 20, 60, 104] and config.training.global_batch_size == 4


def test_the_plan_counts_the_jvp_of_the_rcm_recipe(monkeypatch):
    """The generator phase holds the student's JVP forward: twice a no-grad forward's transient
    (a tangent beside each activation) plus attention's tangent workspace (1 GiB at 31,200 tokens)."""
    import distill.jvp as jvp_module
    import distill.plan as plan_module
    from distill.models import build_adapter
    from distill.plan import forward_bytes, layout_of, make_plan

    planned = validate(compose_config(["experiment=wan21_t2v_1.3b_rcm_4step", "data.path=/unused", "plan=true"]))
    adapter, layout = build_adapter(planned.model), layout_of(planned)
    plan = make_plan(planned, adapter, layout, 80)
    assert plan.fits
    monkeypatch.setattr(plan_module, "TANGENT_COPIES", 1)
    monkeypatch.setattr(jvp_module, "ATTENTION_WORKSPACE_BYTES", 0)
    without = make_plan(planned, adapter, layout, 80)
    from distill.methods.base import Forward

    student = plan_module.networks(planned, adapter)["student"]
    _, transient = forward_bytes(planned, adapter, student, Forward("student", 1, False), plan.tokens, layout)
    extra = plan.roles["student"].activations["generator"] - without.roles["student"].activations["generator"]
    assert extra == pytest.approx(transient + 2**30, rel=1e-9)
