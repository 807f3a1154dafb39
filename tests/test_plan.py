"""The memory plan: its estimate against tensors really held on the CPU, the
H100 figure it must match, its refusals, and the 14B recipes' layouts."""

import json

import pytest

from conftest import compose_config, run_launch
from distill.config import validate
from distill.models import build_adapter
from distill.models.wan import PUBLIC_ARCHITECTURES
from distill.plan import GiB, Layout, layout_of, make_plan, measured_peak, networks
from distill.run import build_trainer

# the tiny Wan with a long sequence (2,048 tokens) and a wider block, so that
# activations, not the few weights, make the peak
BASE = ["experiment=tiny", "logger=none", "data.batch_size=1"]
LONG = [*BASE, "model.arch.attention_head_dim=64", "model.arch.ffn_dim=512", "model.latent_shape=[16,8,32,32]"]


# the tiny Qwen-Image at 1,024 image tokens (64x64 latents, packed 2x2) and 64 text
# tokens, head width 64
QWEN_LONG = [*BASE, "model=qwen_image_tiny", "model.arch.attention_head_dim=64", "model.arch.axes_dims_rope=[16,24,24]",
             "model.latent_shape=[4,1,64,64]", "model.text_len=64"]
# the tiny LTX-2 with 1,024 video tokens (4 x 16 x 16, head width 64) and 40 audio tokens
LTX2_LONG = [*BASE, "model=ltx2_tiny", "model.arch.attention_head_dim=64", "model.arch.cross_attention_dim=128",
             "model.latent_shape=[8,4,16,16]", "model.audio_shape=[2,40,4]"]
BF16 = ["roles.student.precision=bf16", "roles.critic.precision=bf16", "roles.teacher.precision=bf16",
        "method.generator_update_interval=1", "data.batch_size=2"]


@pytest.mark.parametrize("overrides", [
    LONG,
    [*LONG, "roles.student.activation_checkpointing=full", "roles.critic.activation_checkpointing=full"],
    [*LONG, *BF16],
    QWEN_LONG,
    [*QWEN_LONG, "roles.student.activation_checkpointing=full", "roles.critic.activation_checkpointing=full", *BF16],
    LTX2_LONG,
    [*LTX2_LONG, "roles.student.activation_checkpointing=full", "roles.critic.activation_checkpointing=full", *BF16],
], ids=["fp32", "checkpointing", "bf16_batch2", "qwen_image_fp32", "qwen_image_checkpointing_bf16", "ltx2_fp32",
        "ltx2_checkpointing_bf16"])
def test_plan_is_within_20_percent_of_the_measured_peak(tmp_path, overrides):
    config = validate(compose_config(overrides))
    planned = make_plan(config, build_adapter(config.model), layout_of(config), 80).peak
    measured = measured_peak(build_trainer(config, tmp_path), iterations=2)  # a generator and a critic iteration
    assert 0.8 * measured <= planned <= 1.2 * measured, (planned, measured)


def test_plan_of_the_3_step_recipe_matches_the_h100_peak():
    """One H100, 1.3B 3-step recipe, batch 1, 81x480x832, full checkpointing, fp32
    masters, no sharding: 50.3 GiB peak measured (design.md section 8)."""
    config = validate(compose_config(["experiment=wan21_t2v_1.3b_dmd2_3step", "plan=true"]))
    plan = make_plan(config, build_adapter(config.model), Layout(1, 1, 1), 80)
    assert plan.tokens == 32760
    assert 0.8 * 50.3 <= plan.peak / GiB <= 1.2 * 50.3


def test_offloaded_teacher_leaves_only_its_gathered_blocks_on_the_gpu():
    common = ["experiment=wan21_t2v_1.3b_dmd2_4step_14b_teacher_8gpu", "plan=true"]
    plain = validate(compose_config(common))
    offload = validate(compose_config([*common, "roles.teacher.cpu_offload=true"]))
    a = make_plan(plain, build_adapter(plain.model), layout_of(plain), 80).roles["teacher"]
    b = make_plan(offload, build_adapter(offload.model), layout_of(offload), 80).roles["teacher"]
    block = (14e9 / 40) * 2 / GiB  # about one 14B block in bf16
    assert b.cpu == pytest.approx(a.params - b.params) and b.cpu / GiB == pytest.approx(14.3e9 * 2 / 8 / GiB, rel=0.1)
    assert 1.5 * block <= b.params / GiB <= 2.5 * block  # the block in use and the prefetched one


def test_plan_prints_the_table_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    result = run_launch(["experiment=wan21_t2v_1.3b_dmd2_3step", "plan=true", f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "memory plan per GPU: 1 rank(s)" in out and "32760 tokens per sample" in out
    for line in ("student", "teacher", "critic", "phase generator:", "phase critic:"):
        assert line in out
    assert "of 80 GiB per GPU (72.0 usable): fits" in out
    assert not run.exists()


def test_plan_refuses_a_job_that_does_not_fit_and_names_what_would(tmp_path):
    result = run_launch(["experiment=wan21_t2v_14b_dmd2_4step_cp4", "plan=true", "parallel.context=1",
                         "training.global_batch_size=16", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    assert "does NOT fit" in result.stderr
    assert "config error: the peak of" in result.stderr and "exceeds the 72.0 GiB usable of launcher.gpu_memory_gib=80" in result.stderr
    assert "smallest that fits (80 GiB GPUs): 1 node(s) x 8 GPUs with parallel.context=8" in result.stderr
    small = run_launch(["experiment=wan21_t2v_1.3b_dmd2_3step", "plan=true", "launcher.gpu_memory_gib=24",
                        f"hydra.run.dir={tmp_path / 'small'}"])
    assert small.returncode == 2 and "exceeds the 21.6 GiB usable of launcher.gpu_memory_gib=24" in small.stderr


def test_plan_refuses_a_context_that_does_not_divide_the_heads(tmp_path):
    result = run_launch(["experiment=wan21_t2v_1.3b_dmd2_3step", "plan=true", "launcher.nproc_per_node=8",
                         "parallel.context=8", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    assert ("parallel.context=8 does not divide num_attention_heads=12 of model.path: Ulysses gives each rank "
            "whole heads") in result.stderr


def test_14b_student_recipe_fits_with_context_parallelism_and_not_without():
    config = validate(compose_config(["experiment=wan21_t2v_14b_dmd2_4step_cp4", "plan=true"]))
    assert (config.parallel.context, config.launcher.nodes, config.launcher.gpus_per_node) == (4, 2, 8)
    adapter = build_adapter(config.model)
    with_cp = make_plan(config, adapter, layout_of(config), 80)
    without = make_plan(config, adapter, Layout(16, 1, 1), 80)
    assert with_cp.fits and not without.fits
    numel = sum(p.numel() for p in networks(config, adapter)["student"].parameters())
    assert 14e9 < numel < 14.5e9
    student = with_cp.roles["student"]
    assert student.optimizer == 8 * numel / 16 and student.grads >= 4 * numel / 16  # fp32 moments and gradients
    assert student.ema == 4 * numel / 16


def test_14b_recipe_dry_run_shows_nodes_tasks_and_context_groups(tmp_path):
    """The weights are not here: a model folder holding only the 14B config.json stands in."""
    folder = tmp_path / "wan14b" / "transformer"
    folder.mkdir(parents=True)
    arch = dict(PUBLIC_ARCHITECTURES["Wan-AI/Wan2.1-T2V-14B-Diffusers"], _class_name="WanTransformer3DModel")
    (folder / "config.json").write_text(json.dumps(arch))
    result = run_launch(["experiment=wan21_t2v_14b_dmd2_4step_cp4", "launcher.dry_run=true", f"data.path={tmp_path}",
                         f"model.path={folder.parent}", f"hydra.run.dir={tmp_path / 'dry'}"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "16 ranks = 2 node(s) x 8 tasks; mesh replicate 1 x shard 4 x context 4" in out
    assert "4 data-parallel group(s) of 4 rank(s)" in out
    assert "data rank 1: ranks 4-7 on node 0" in out and "data rank 2: ranks 8-11 on node 1" in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-node=8" in out
