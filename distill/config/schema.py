"""Typed config schema, registered in Hydra's ConfigStore.

The YAML files under conf/ fill these dataclasses; OmegaConf enforces key names
and types when the config is composed, and `validate.py` adds the checks that
span several fields. Nothing here imports torch.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Dict, List, Optional

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class ModelFamily(str, Enum):
    wan = "wan"  # diffusers WanTransformer3DModel (Wan2.1 T2V)


class VaeKind(str, Enum):
    wan = "wan"  # AutoencoderKLWan from <model.path>/vae
    identity = "identity"  # the latents are the pixels (the digits demo)


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Rollout(str, Enum):
    simulate = "simulate"  # data-free backward simulation from pure noise
    data = "data"  # noise a real latent to a listed step


class SchedulerName(str, Enum):
    # the names of diffusers.optimization.get_scheduler
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"


@dataclass
class ModelConfig:
    family: ModelFamily = ModelFamily.wan  # which adapter in distill/models serves it
    # A diffusers pipeline folder (or a Hugging Face repo id already in the local
    # cache); the transformer is read from `<path>/<subfolder>`. null builds
    # `arch` with random weights (tiny models for CPU runs and tests).
    path: Optional[str] = None
    subfolder: str = "transformer"
    arch: Dict[str, Any] = field(default_factory=dict)
    shift: float = 3.0  # flow shift: sigma' = s*sigma / (1 + (s-1)*sigma)
    latent_shape: List[int] = field(default_factory=lambda: [16, 21, 60, 104])  # C, T, H, W
    text_len: int = 512
    text_dim: int = 4096
    # per-channel statistics of the VAE's latents: data latents are
    # normalised as (x - mean) / std before training; null: used as stored
    latents_mean: Optional[List[float]] = None
    latents_std: Optional[List[float]] = None
    vae: VaeKind = VaeKind.wan  # how samples are decoded to pixels


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.constant
    warmup_steps: int = 0
    # the number of optimizer steps the schedule spans; null: the run's length
    total_steps: Optional[int] = None


@dataclass
class RoleConfig:
    path: Optional[str] = None  # weights of this role; null: model.path
    trainable: bool = False
    precision: Precision = Precision.fp32
    activation_checkpointing: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_grad_norm: float = 1.0
    # exponential moving average of a trainable role's weights (null: none);
    # before ema_start_step the average simply copies the weights
    ema_decay: Optional[float] = None
    ema_start_step: int = 0


@dataclass
class MethodConfig:
    name: str = MISSING
    # role name -> "trainable" or "frozen": the roles this method needs
    roles: ClassVar[Dict[str, str]] = {}


@dataclass
class DMD2Config(MethodConfig):
    name: str = "dmd2"
    # The student's steps as sigma*1000 before the shift, from noisiest down.
    student_steps: List[int] = field(default_factory=lambda: [1000, 757, 522])
    # true: pass the listed steps through the model's shift (the warped list)
    warp_steps: bool = True
    rollout: Rollout = Rollout.simulate
    # Teacher CFG as uncond + w * (cond - uncond). Recipes written as
    # cond + w' * (cond - uncond) use w = w' + 1.
    guidance_scale: float = 4.5
    generator_update_interval: int = 5
    min_timestep_ratio: float = 0.02
    max_timestep_ratio: float = 0.98
    generator_lr: float = 2e-6  # roles.student.optimizer.lr follows it
    critic_lr: float = 2e-6  # roles.critic.optimizer.lr follows it
    roles: ClassVar[Dict[str, str]] = {"student": "trainable", "teacher": "frozen", "critic": "trainable"}


@dataclass
class FinetuneConfig(MethodConfig):
    name: str = "finetune"
    lr: float = 1e-5  # roles.student.optimizer.lr follows it
    # probability of training on the empty prompt, so that CFG works later
    condition_dropout: float = 0.1
    roles: ClassVar[Dict[str, str]] = {"student": "trainable"}


@dataclass
class TrainingConfig:
    max_steps: int = 10
    grad_accum_steps: int = 1
    log_every: int = 1
    device: str = "auto"  # auto: cuda when available, else cpu
    torch_threads: Optional[int] = None  # null: torch's default
    # checkpoint-<step>/ folders in the run folder; a run started in a folder
    # that holds one resumes from the newest complete one
    checkpoint_every: int = 500
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    resume: bool = True  # resume from the run folder's newest checkpoint
    resume_from: Optional[str] = None  # a checkpoint folder to resume from instead
    export_at_end: bool = True  # write the student in diffusers format at the end
    # data-parallel layout: shard over all ranks (1), or HSDP with this many
    # replicas of a shard group of world_size / hsdp_replicas ranks
    hsdp_replicas: int = 1
    collective_timeout_s: int = 600  # a collective waiting longer than this fails


class DataName(str, Enum):
    synthetic = "synthetic"  # random latents and text of the model's shapes
    parquet = "parquet"  # a folder of FastVideo-schema parquet shards
    digits = "digits"  # the moving-digits demo set, built and cached on first use


@dataclass
class DataConfig:
    name: DataName = DataName.synthetic
    batch_size: int = 1
    # synthetic: a fixed pool of this many random samples, cycled in order
    num_samples: int = 8
    # parquet: the dataset folder; digits: the cache folder (null: ~/.cache/distill)
    path: Optional[str] = None
    split: str = "train"  # digits: train or val
    text_only: bool = False  # parquet: rows without latents (data-free DMD)
    # safetensors file whose `text_embeds` [L, D] is the empty/negative prompt;
    # null: zeros
    negative_embedding: Optional[str] = None
    num_workers: int = 0  # loader worker processes per rank
    # rows are shuffled within windows of this many row groups, which a
    # reader holds in memory; row groups themselves are shuffled every epoch
    shuffle_window: int = 8


class LoggerName(str, Enum):
    wandb = "wandb"
    none = "none"


class WandbMode(str, Enum):
    auto = "auto"  # online when logged in (WANDB_API_KEY or ~/.netrc), else offline
    offline = "offline"
    online = "online"


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.wandb
    mode: WandbMode = WandbMode.offline
    project: str = "distill"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    progress_bar: bool = True  # step, losses, it/s and ETA on the console (rank 0)


@dataclass
class ValidationConfig:
    every: int = 0  # steps between validations; 0: only at the end
    num_samples: int = 16  # fixed prompts, each at a fixed seed
    seed: int = 1234
    teacher_steps: int = 50  # the teacher's reference sampling (Euler, with CFG)
    guidance_scale: Optional[float] = None  # teacher/finetune CFG; null: method.guidance_scale or 1
    metrics: bool = True  # quality metrics where the data has them (digits)
    fps: int = 4  # of the saved GIFs


class LauncherName(str, Enum):
    local = "local"  # this machine: in-process, or nproc_per_node processes
    slurm = "slurm"  # a SLURM job (a job array for a sweep) through submitit


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.local
    # local: processes on this machine (1 runs in the launching process)
    nproc_per_node: int = 1
    # slurm: one task per GPU (tasks_per_node overrides, e.g. for CPU jobs)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None  # null: gpus_per_node (1 when 0)
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None  # per node; null: the partition's default
    time_min: int = 1440
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    sbatch_extra: Dict[str, Any] = field(default_factory=dict)  # more #SBATCH --key=value lines
    setup: List[str] = field(default_factory=list)  # shell lines run before the job starts
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # preemptions / time limits survived by requeueing
    job_name: str = "distill"
    array_parallelism: int = 64  # sweep points running at once
    snapshot_code: bool = True  # the job imports a copy of distill/ made at submission
    wait: bool = False  # wait for the job(s) and exit with their result
    dry_run: bool = False  # print the sbatch script, submit nothing


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = MISSING  # one of the MethodConfig subclasses
    roles: Dict[str, RoleConfig] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    seed: int = 0


METHOD_SCHEMAS = {"dmd2": DMD2Config, "finetune": FinetuneConfig}


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def register_configs() -> None:
    # ${project_root:} in a config is this checkout's folder (shipped assets live there)
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/role", name="role", node=RoleConfig)
    cs.store(group="schema/training", name="training", node=TrainingConfig)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/launcher", name="launcher", node=LauncherConfig)
    cs.store(group="schema/logger", name="logger", node=LoggerConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="schema/method", name=name, node=schema)
