"""Every config file composes; every invalid config is refused by launch.py
with a message naming the key, before any model is built."""

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config, run_launch
from distill.config import ConfigError, validate
from distill.config.schema import Config
from distill.methods.dmd2 import DMD2Config
from distill.methods.finetune import FinetuneConfig

GROUPS = ["model", "method", "training", "data", "launcher"]


def options(group):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS + ["role", "experiment"]:
        assert options(group), f"conf/{group} is empty"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes(group, option, tmp_path):
    extra = {("data", "parquet"): [f"data.path={tmp_path}"], ("data", "digits"): ["model=digits"],
             ("method", "dmd2_digits"): ["model=digits"]}  # its GAN head reads the digits model's blocks 1 and 3
    cfg = compose_config([f"{group}={option}", *extra.get((group, option), [])])
    assert OmegaConf.select(cfg, group) is not None
    if group != "model" or option in ("wan_tiny", "digits", "qwen_image_tiny"):  # real models need their weights
        config = validate(cfg)
        assert isinstance(config, Config)


@pytest.mark.parametrize("option", options("role"))
def test_role_preset_composes_into_any_role(option):
    cfg = compose_config([f"role@roles.student={option}"])
    assert OmegaConf.to_container(cfg.roles.student, resolve=True)["trainable"] in (True, False)


RECIPE_FAMILIES = ("wan", "qwen_image", "ltx2")  # experiments named after a real model: they need its weights


@pytest.mark.parametrize("option", [o for o in options("experiment") if not o.startswith(RECIPE_FAMILIES)])
def test_demo_experiment_validates(option):
    assert isinstance(validate(compose_config([f"experiment={option}"])), Config)


@pytest.mark.parametrize("option", [o for o in options("experiment") if o.startswith(RECIPE_FAMILIES)])
def test_recipe_composes_and_only_lacks_weights(option, tmp_path):
    """A recipe that starts from a pretrained student lists it under `required`: without it
    the refusal is one line per key, before any model folder is looked at."""
    cfg = compose_config([f"experiment={option}", f"data.path={tmp_path}"])
    assert cfg.model.path.startswith(("Wan-AI/", "Qwen/", "Lightricks/"))
    required = dict(cfg.required)
    if required:
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        assert str(err.value).splitlines() == [f"{key} is null: this recipe needs it ({why})"
                                               for key, why in required.items()]
        cfg = compose_config([f"experiment={option}", f"data.path={tmp_path}",
                              *(f"{key}={tmp_path / 'pretrained'}" for key in required)])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert all("path" in line and "no model there" in line for line in str(err.value).splitlines())


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
def test_sweep_composes(sweep):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, f"sweeps/{sweep}.yaml defines no sweeper params"
    for key in params:
        assert OmegaConf.select(cfg, key) is not None, f"sweeps/{sweep}.yaml sweeps unknown key {key}"


def test_default_is_typed_dmd2_on_the_tiny_model():
    config = validate(compose_config())
    assert isinstance(config.method, DMD2Config)
    assert set(config.roles) == {"student", "teacher", "critic"}
    assert config.model.path is None and config.model.arch


def test_method_lrs_reach_the_role_optimizers(tmp_path):
    """One source of truth per learning rate: the method's key, which the optimizers use
    and the saved config shows; the role's own lr stays null."""
    from distill.config.io import load_config, save_config
    from distill.run import build_trainer

    config = validate(compose_config(["method.generator_lr=3e-6", "method.critic_lr=7e-6"]))
    trainer = build_trainer(config, tmp_path)
    assert trainer.roles["student"].lr() == 3e-6 and trainer.roles["critic"].lr() == 7e-6
    save_config(config, tmp_path / "c.yaml")
    saved = load_config(tmp_path / "c.yaml")
    assert (saved.method.generator_lr, saved.roles["student"].optimizer.lr) == (3e-6, None)
    finetune = validate(compose_config(["method=finetune", "method.lr=4e-4"]))
    assert isinstance(finetune.method, FinetuneConfig)
    assert set(finetune.roles) == {"student"}


def test_bigger_teacher_is_one_override(tiny_model_dir):
    config = validate(compose_config([f"roles.teacher.path={tiny_model_dir}"]))
    assert config.roles["teacher"].path == str(tiny_model_dir)
    assert config.roles["student"].path is None


INVALID = [
    (["~roles.critic"], "roles.critic is missing"),
    (["roles.teacher.trainable=true"], "roles.teacher.trainable=true: method dmd2 needs the teacher frozen (allowed: false)"),
    (["method.student_steps=[]"], "method.student_steps is empty"),
    (["method.student_steps=[500,757]"], "method.student_steps=[500, 757]: must be strictly decreasing"),
    (["method.student_steps=[1200,500]"], "each step must be in (0, 1000]"),
    (["method.min_timestep_ratio=0.9", "method.max_timestep_ratio=0.1"], "need 0 <= min_timestep_ratio < max_timestep_ratio <= 1"),
    (["model.path=/nonexistent/wan"], "model.path=/nonexistent/wan: no model there; tried /nonexistent/wan/transformer/config.json"),
    (["roles.teacher.path=/nonexistent/big"], "roles.teacher.path=/nonexistent/big: no model there"),
    (["model.text_dim=64"], "model.text_dim=64 does not match text_dim=32"),
    (["method.generator_update_interval=0"], "method.generator_update_interval=0: must be >= 1"),
    (["training.max_steps=0"], "training.max_steps=0: must be >= 1"),
    (["method=finetune", "+role@roles.critic=critic"], "roles.critic is not used by method finetune"),
    (["+roles.teacher.bogus_key=1"], "roles.teacher.bogus_key: unknown key (RoleConfig has"),
    (["+training.bogus=1"], "training.bogus: unknown key (TrainingConfig has"),
    (["roles.student.optimizer.lr=1e-3"], "roles.student.optimizer.lr=0.001: the student's learning rate is method.generator_lr"),
    (["checkpoint.every=-1"], "checkpoint.every=-1: must be >= 0"),
    (["validation.every=-3"], "validation.every=-3: must be >= 0"),
    (["checkpoint.folder=ckpt"], "checkpoint.folder=ckpt: must be a folder name holding {step}"),
    (["parallel.replicate=2"], "parallel.replicate=2 x parallel.shard=-1 x parallel.context=1 does not fit the 1 ranks"),
    (["parallel.context=4", "launcher.nproc_per_node=4"],
     "parallel.context=4 does not divide num_attention_heads=2 of model.arch: Ulysses gives each rank whole heads"),
    (["parallel.context=2", "launcher.nproc_per_node=2", "model.latent_shape=[16,3,6,2]"],
     "parallel.context=2 does not divide the 9 tokens of model.latent_shape=[16, 3, 6, 2]"),
    (["roles.student.cpu_offload=true", "launcher.nproc_per_node=2"],
     "roles.student.cpu_offload=true: only a frozen role's weights are offloaded (this one trains)"),
    (["roles.teacher.cpu_offload=true"],
     "roles.teacher.cpu_offload=true: offloading goes through FSDP2, which needs 2 or more ranks (the launcher gives 1)"),
    (["roles.student.lora.rank=-1"], "roles.student.lora.rank=-1: must be >= 0"),
    (["roles.teacher.lora.rank=4"], "roles.teacher.lora.rank=4: LoRA needs a trainable role"),
    (["model.family=nope"], "model.family=nope: no such model family (registered: ltx2, qwen_image, wan"),
    (["method.gan.enabled=true", "method.gan.blocks=[0,7,-3]"],
     "method.gan.blocks=[0, 7, -3]: 7, -3 outside the 2 blocks of roles.critic's network (model.arch); allowed: -2 to 1"),
    (["roles.student.lora.rank=4", "roles.student.lora.target_modules=[to_q,to_x]"],
     "roles.student.lora.target_modules: no linear layer of the network (model.arch) matches to_x; its layers: "
     "attn1.to_k, attn1.to_out.0"),
    (["method.student_step_draw=per_sample"], "method.student_step_draw=per_sample: needs method.rollout=data"),
    (["method.clean_step=true", "method.rollout=data"],
     "method.clean_step=true needs method.student_step_draw=per_chunk (got shared)"),
    (["method.student_step_draw=per_chunk", "method.rollout=data"],
     "method.student_step_draw=per_chunk needs a block-causal student (model.chunk_frames"),
    (["method.critic_sample=fresh", "method.critic_on_generator_iterations=false"],
     "method.critic_sample=fresh with method.critic_on_generator_iterations=false"),
    (["method.critic_on_generator_iterations=false", "method.generator_update_interval=1"],
     "the critic would never train"),
    (["roles.student.optimizer.weight_decay=-1"], "roles.student.optimizer.weight_decay=-1.0: must be >= 0"),
    (["roles.student.optimizer.eps=0"], "roles.student.optimizer.eps=0.0: must be > 0"),
    (["roles.student.scheduler.total_steps=0"], "roles.student.scheduler.total_steps=0: must be >= 1"),
    (["roles.student.scheduler.name=cosine", "roles.student.scheduler.warmup_steps=50",
      "roles.student.scheduler.total_steps=10"],
     "roles.student.scheduler.warmup_steps=50 exceeds roles.student.scheduler.total_steps=10"),
    (["roles.student.ema_start_step=-1"], "roles.student.ema_start_step=-1: must be >= 0"),
    (["roles.teacher.ema_decay=0.9"], "roles.teacher.ema_decay=0.9: an average of weights needs a trainable role"),
    (["roles.student.max_grad_norm=0"], "roles.student.max_grad_norm=0.0: must be > 0 (null: no clipping)"),
    (["training.torch_threads=0"], "training.torch_threads=0: must be >= 1"),
    (["training.collective_timeout_s=0"], "training.collective_timeout_s=0: must be >= 1"),
    (["checkpoint.resume_from=/nonexistent/ckpt"], "checkpoint.resume_from=/nonexistent/ckpt: no such folder"),
    (["data.shuffle_window=0"], "data.shuffle_window=0: must be >= 1"),
    (["data.negative_embedding=/nonexistent.safetensors"], "data.negative_embedding=/nonexistent.safetensors: no such file"),
    (["validation.teacher_steps=0"], "validation.teacher_steps=0: must be >= 1"),
    (["validation.fps=0"], "validation.fps=0: must be >= 1"),
    (["validation.guidance_scale=-1"], "validation.guidance_scale=-1.0: must be >= 0"),
    (["launcher=slurm", "launcher.signal_delay_s=-1"], "launcher.signal_delay_s=-1: must be >= 0"),
    (["launcher=slurm", "launcher.mem_gb=0"], "launcher.mem_gb=0: must be >= 1"),
    (["launcher.gpu_memory_gib=0"], "launcher.gpu_memory_gib=0.0: must be > 0"),
    (["model.shift=0"], "model.shift=0.0: must be > 0 (1: no shift)"),
    (["model.text_len=0"], "model.text_len=0: must be >= 1"),
    (["model.latents_mean=[0.0]", "model.latents_std=[1.0]"],
     "model.latents_mean has 1 values for the 16 latent channels (model.latent_shape[0])"),
    (["model.latents_std=[0.0]"], "model.latents_mean and model.latents_std: give both (or neither)"),
    (["model.latent_shape=[16,0,4,4]"], "model.latent_shape=[16, 0, 4, 4]: every size must be >= 1"),
    (["logger=wandb", "logger.project="], "logger.project is empty: wandb needs a project name"),
    (["method=ode_init", "method.clean_step=true", "model.chunk_frames=null", "roles.student.causal=false"],
     "method.clean_step=true needs a block-causal student"),
    (["method.student_sampler=deterministic", "model.chunk_frames=2", "roles.student.causal=true"],
     "method.student_sampler=deterministic with model.chunk_frames: the chunk-by-chunk sampler re-noises"),
]


@pytest.mark.parametrize("overrides,message", INVALID)
def test_invalid_config_is_rejected(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["roles.teacher.trainable=true"], "roles.teacher.trainable=true"),
        (["method.student_steps=[]"], "method.student_steps is empty"),
        (["model=wan"], "model.path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers: no model there"),
        (["method.foo=1"], "Key 'foo' not in 'DMD2Config'"),
        (["training.max_steps=abc"], "full_key: training.max_steps"),
        (["method.rollout=sideways"], "expected one of [simulate, data]"),
        (["model=nope"], "Available options in 'model'"),
        (["+roles.teacher.bogus_key=1"], "roles.teacher.bogus_key: unknown key"),
        (["training.checkpoint_every=-1"], "Key 'checkpoint_every' not in 'TrainingConfig'"),
        (["checkpoint.every=-1"], "checkpoint.every=-1: must be >= 0"),
        (["validation.every=-3"], "validation.every=-3: must be >= 0"),
        (["method.gan.enabled=true", "method.gan.blocks=[0,7]"], "method.gan.blocks=[0, 7]: 7 outside the 2 blocks"),
        (["roles.student.lora.rank=4", "roles.student.lora.target_modules=[to_x]"],
         "roles.student.lora.target_modules: no linear layer of the network (model.arch) matches to_x"),
        (["method.student_step_draw=per_sample"], "method.student_step_draw=per_sample: needs method.rollout=data"),
        (["model.shift=0"], "model.shift=0.0: must be > 0"),
    ],
)
def test_launch_rejects_bad_config_without_traceback(tmp_path, overrides, message):
    result = run_launch([*overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()  # a refused config leaves no run folder


def test_cfg_job_prints_composed_config():
    result = run_launch(["--cfg", "job", "method.guidance_scale=2.5"])
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.method.guidance_scale == 2.5 and printed.method.name == "dmd2"


def test_slurm_dry_run_prints_the_script_without_slurm(tmp_path, monkeypatch):
    """No srun/sbatch on PATH: the dry run still prints the sbatch script; a real
    submission is refused in one line."""
    import os
    import shutil

    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("python", "python3"):
        (bare / tool).symlink_to(shutil.which(tool) or __import__("sys").executable)
    path = f"{bare}:/usr/bin:/bin"
    if any(os.path.exists(os.path.join(d, "srun")) for d in path.split(":")):
        path = str(bare)
    monkeypatch.setenv("PATH", path)
    dry = run_launch(["launcher=slurm", "launcher.dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}"])
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH" in dry.stdout and "--kill-on-bad-exit=1" in dry.stdout
    assert "Traceback" not in dry.stderr
    real = run_launch(["launcher=slurm", f"hydra.run.dir={tmp_path / 'real'}"])
    assert real.returncode == 1
    assert "launcher=slurm: sbatch and srun not found on PATH" in real.stderr
    assert "Traceback" not in real.stderr and len(real.stderr.strip().splitlines()) == 1


def test_a_family_reads_its_own_keys_and_refuses_a_section_of_another(tmp_path):
    """Wan's keys live in WanConfig: a Qwen-Image model has no boundary_ratio, and a model
    section composed for one family but naming another is refused in one line."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["model=qwen_image_tiny", "model.boundary_ratio=0.9"])
    assert "boundary_ratio" in str(err.value.__cause__)
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["model=wan_tiny", "model.family=qwen_image"]))
    assert str(err.value) == ("model.family=qwen_image: the model section was composed from WanConfig, not "
                              "QwenImageConfig; a model YAML names its family's keys first "
                              "(defaults: [/schema/model@_here_: qwen_image, _self_])")


def test_a_config_saved_before_families_owned_their_keys_loads(tmp_path):
    """A run folder's config.yaml from before the split (every key under model, enums as
    strings) loads with Wan's keys typed by WanConfig: resume and export read it."""
    from distill.config.io import load_config, save_config
    from distill.models.wan_config import ImageCondition, WanConfig

    config = validate(compose_config(["experiment=tiny"]))
    save_config(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "boundary_ratio: null" in text and "image_condition: none" in text  # the keys as they always were
    loaded = load_config(tmp_path / "config.yaml")
    assert isinstance(loaded.model, WanConfig) and loaded.model.image_condition == ImageCondition.none
    assert loaded == config
