"""Every config file composes; every invalid config is refused by launch.py
with a message naming the key, before any model is built."""

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config, run_launch
from distill.config import ConfigError, validate
from distill.config.schema import Config, DMD2Config, FinetuneConfig

GROUPS = ["model", "method", "training", "data", "launcher"]


def options(group):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS + ["role", "experiment"]:
        assert options(group), f"conf/{group} is empty"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes(group, option, tmp_path):
    extra = {("data", "parquet"): [f"data.path={tmp_path}"], ("data", "digits"): ["model=digits"]}
    cfg = compose_config([f"{group}={option}", *extra.get((group, option), [])])
    assert OmegaConf.select(cfg, group) is not None
    if group != "model" or option in ("wan_tiny", "digits"):  # real models need their weights
        config = validate(cfg)
        assert isinstance(config, Config)


@pytest.mark.parametrize("option", options("role"))
def test_role_preset_composes_into_any_role(option):
    cfg = compose_config([f"role@roles.student={option}"])
    assert OmegaConf.to_container(cfg.roles.student, resolve=True)["trainable"] in (True, False)


@pytest.mark.parametrize("option", [o for o in options("experiment") if not o.startswith("wan")])
def test_demo_experiment_validates(option):
    assert isinstance(validate(compose_config([f"experiment={option}"])), Config)


@pytest.mark.parametrize("option", [o for o in options("experiment") if o.startswith("wan")])
def test_wan_experiment_composes_and_only_lacks_weights(option, tmp_path):
    cfg = compose_config([f"experiment={option}", f"data.path={tmp_path}"])
    assert cfg.model.path.startswith("Wan-AI/")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert all("path" in line and "no model there" in line for line in str(err.value).splitlines())


def test_experiment_recipes_carry_published_numbers():
    three = compose_config(["experiment=wan21_t2v_1.3b_dmd2_3step"])
    assert list(three.method.student_steps) == [1000, 757, 522]
    assert (three.model.shift, three.method.guidance_scale, three.method.rollout) == (8.0, 4.5, "data")
    four = compose_config(["experiment=wan21_t2v_1.3b_dmd2_4step"])
    assert list(four.method.student_steps) == [1000, 750, 500, 250]
    assert (four.method.critic_lr, four.roles.critic.optimizer.lr, list(four.roles.student.optimizer.betas)) == (
        4e-7,
        4e-7,
        [0.0, 0.999],
    )
    big = compose_config(["experiment=wan21_t2v_1.3b_dmd2_8step_14b_teacher"])
    assert big.roles.teacher.path == "Wan-AI/Wan2.1-T2V-14B-Diffusers" and big.roles.student.path is None


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


def test_method_lrs_flow_into_role_optimizers():
    config = validate(compose_config(["method.generator_lr=3e-6", "method.critic_lr=7e-6"]))
    assert config.roles["student"].optimizer.lr == 3e-6
    assert config.roles["critic"].optimizer.lr == 7e-6
    finetune = validate(compose_config(["method=finetune", "method.lr=4e-4"]))
    assert isinstance(finetune.method, FinetuneConfig)
    assert set(finetune.roles) == {"student"} and finetune.roles["student"].optimizer.lr == 4e-4


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
    ],
)
def test_launch_rejects_bad_config_without_traceback(tmp_path, overrides, message):
    result = run_launch([*overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "final").exists()


def test_cfg_job_prints_composed_config():
    result = run_launch(["--cfg", "job", "method.guidance_scale=2.5"])
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.method.guidance_scale == 2.5 and printed.method.name == "dmd2"
