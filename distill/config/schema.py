"""Typed config schema, registered in Hydra's ConfigStore.

The YAML files under conf/ fill these dataclasses; OmegaConf enforces key names
and types when the config is composed, and `validate.py` adds the checks that
span several fields. A method's own config class lives with the method
(distill/methods/) and is stored here from the registry. Nothing here
imports torch.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class PartsMode(str, Enum):
    link = "link"  # symbolic links to the model folder's parts (a copy where links fail)
    copy = "copy"  # a self-contained folder to ship


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class SchedulerName(str, Enum):
    # the names of diffusers.optimization.get_scheduler
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"


@dataclass
class ModelConfig:
    """What every model family has. A family's own keys live in its config class
    (a subclass, beside its adapter in distill/models/, e.g. WanConfig), which a
    model YAML names first in its defaults (`/schema/model@_here_: wan`)."""

    family: str = MISSING  # the registered model family (distill/models) that serves it
    # A diffusers pipeline folder (or a Hugging Face repo id already in the local
    # cache); the transformer is read from `<path>/<subfolder>`. null builds
    # `arch` with random weights (tiny models for CPU runs and tests).
    path: Optional[str] = None
    subfolder: str = "transformer"
    arch: Dict[str, Any] = field(default_factory=dict)
    shift: float = 1.0  # flow shift: sigma' = s*sigma / (1 + (s-1)*sigma)
    latent_shape: List[int] = field(default_factory=lambda: [1, 1, 1, 1])  # C, T, H, W (an image: T = 1)
    # latent frames per chunk of a block-causal role (roles.<r>.causal): the
    # autoregressive student of CausVid / Self-Forcing; null: no chunking.
    # Families without a block-causal variant refuse causal roles.
    chunk_frames: Optional[int] = None
    text_len: int = 8  # text tokens the data pads (or cuts) each prompt's embedding to
    text_dim: int = 32  # width of the text encoder's embeddings
    # per-channel statistics of the VAE's latents: data latents are
    # normalised as (x - mean) / std before training; null: used as stored
    latents_mean: Optional[List[float]] = None
    latents_std: Optional[List[float]] = None
    # how samples are decoded to pixels: a name the family defines for its own VAE
    # (its `vaes`), or identity (the latents are the pixels: the digits demo)
    vae: str = "identity"
    # how prompts are encoded when sampling by prompt: family (the family's own text
    # encoder, from model.path) or hash (distill/data/hash_text.py: word vectors, no weights)
    text_encoder: str = "hash"
    # diffusers' attention backend for every role (native, _native_cudnn, _native_flash,
    # flash, sage, ...: diffusers.models.attention_dispatch.AttentionBackendName);
    # null: diffusers' default (PyTorch SDPA, which picks its kernel itself)
    attention_backend: Optional[str] = None


@dataclass
class OptimizerConfig:
    # null: the learning rate the method gives this role (e.g. method.generator_lr);
    # a role the method gives none must set it
    lr: Optional[float] = None
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.constant
    warmup_steps: int = 0
    # the number of optimizer steps the schedule spans; null: the run's length
    total_steps: Optional[int] = None


class EmaUpdate(str, Enum):
    step = "step"  # after each optimizer step of the role
    iteration = "iteration"  # after every training iteration, stepped or not (FastVideo's callback)


@dataclass
class LoraConfig:
    rank: int = 0  # 0: no LoRA, the whole network trains
    alpha: Optional[float] = None  # scale alpha / rank; null: alpha = rank
    dropout: float = 0.0
    # module names (peft's target_modules); null: the model family's default
    # (Wan: the attention and FFN projections of every block)
    target_modules: Optional[List[str]] = None
    # a frozen role whose network these adapters are added to, in memory: one
    # copy of the base serves both (e.g. the critic over the teacher's weights);
    # that role runs with the adapters off. null: this role loads its own base
    base_role: Optional[str] = None


class Checkpointing(str, Enum):
    """Activation checkpointing of a role's blocks."""
    none = "none"  # keep every activation the backward needs
    selective = "selective"  # keep attention and matmul outputs; recompute norms, activations, elementwise ops
    full = "full"  # keep each block's input; recompute the whole block in the backward


@dataclass
class RoleConfig:
    path: Optional[str] = None  # weights of this role; null: model.path
    trainable: bool = False
    precision: Precision = Precision.fp32
    activation_checkpointing: Checkpointing = Checkpointing.none
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_grad_norm: Optional[float] = 1.0  # null: no clipping (the norm is still logged)
    # exponential moving average of a trainable role's weights (null: none):
    # shadow = decay * shadow + (1 - decay) * weights at each update (ema_update);
    # an update in an iteration up to ema_start_step (1-based) copies the weights
    ema_decay: Optional[float] = None
    ema_start_step: int = 0
    ema_update: EmaUpdate = EmaUpdate.step
    # low-rank adapters on a trainable role: base weights frozen, adapters trained
    lora: LoraConfig = field(default_factory=LoraConfig)
    # keep this frozen role's FSDP shards in CPU memory, copied to the GPU a block
    # at a time (FSDP2's CPUOffloadPolicy): for a large teacher on few GPUs
    cpu_offload: bool = False
    # run this role's network block-causally over chunks of model.chunk_frames
    # latent frames, with a KV cache for generation (Self-Forcing's student)
    causal: bool = False


@dataclass
class MethodConfig:
    """Base of every method's config class (see distill/methods/)."""

    name: str = MISSING


@dataclass
class TrainingConfig:
    max_steps: int = 10
    grad_accum_steps: int = 1
    # samples per optimizer step over all ranks; set, it fixes grad_accum_steps =
    # global_batch_size / (data-parallel ranks x data.batch_size). null: not fixed
    global_batch_size: Optional[int] = None
    log_every: int = 1
    device: str = "auto"  # auto: cuda when available, else cpu
    torch_threads: Optional[int] = None  # null: torch's default
    export_at_end: bool = True  # write the trained roles in diffusers format at the end
    # how a stock pipeline export holds the model folder's text encoder, tokenizer and VAE
    export_parts: PartsMode = PartsMode.link
    collective_timeout_s: int = 600  # a collective waiting longer than this fails
    # torch.compile each transformer block (regional: one compiled block serves every
    # block of a role, and roles of one architecture); null: on when the device is a GPU
    compile: Optional[bool] = None


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (one is always written at the end); 0: only at the end
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    resume: bool = True  # a run started in a folder with a checkpoint resumes from the newest complete one
    resume_from: Optional[str] = None  # a checkpoint folder to resume from instead
    # the name of a checkpoint folder inside the run folder; must hold {step}
    folder: str = "checkpoint-{step}"
    # write in the background: training waits only for the copy of the state to
    # host memory; null: on when the run's device is a GPU
    async_save: Optional[bool] = None


@dataclass
class ParallelConfig:
    """Named mesh dimensions; their product is the number of ranks.

    Data parallelism spans replicate x shard: each replicate group holds a full
    copy of the roles, sharded (FSDP2) over its shard ranks; replicate > 1 is
    HSDP. Ranks of one context group see the same batch (context parallelism,
    size 1 until a model family supports it).
    """

    replicate: int = 1
    shard: int = -1  # -1: the ranks left over, world / (replicate * context)
    context: int = 1
    # one rank shards too: FSDP2 over a mesh of one on a real process group (NCCL
    # on a GPU), the code path of multi-rank runs; false: one rank runs unsharded
    shard_single_rank: bool = False


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
    # digits: pixels per frame, one drawn per clip (the prompt does not say which)
    speeds: List[int] = field(default_factory=lambda: [2])
    frames: int = 4  # digits: frames per clip: 4, or 1 for still images (experiment=digits_image)
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
class HealthConfig:
    """The band around the teacher's sample statistics the student's must stay in
    (distill/validation/health.py)."""

    enabled: bool = True
    motion_floor: float = 0.25  # static: the student's motion under this fraction of the teacher's
    flat_margin: float = 0.5  # flat: the student's share of one-colour frames over the teacher's by this much
    diversity_floor: float = 0.25  # collapsed: the student's diversity over seeds under this fraction of the teacher's
    diversity_seeds: int = 4  # seeds of the first validation prompt for the diversity figures (0: none)


@dataclass
class EvaluateConfig:
    """Evaluation on a prompt file (distill/evaluation; `python -m distill.evaluate` takes the
    same keys as flags): videos named as VBench expects, and the listed metrics, each of
    which needs its network on disk. During training: every `every` steps on the live
    student, or by a watcher job (launcher=slurm) scoring each checkpoint as it completes."""

    prompts: Optional[str] = None  # plain text (a prompt a line) or VBench's JSON prompt list
    every: int = 0  # steps between evaluations of the live student (0: none during training)
    watcher: bool = False  # launcher=slurm: a job beside the run scores each new checkpoint
    samples: int = 1  # videos per prompt, video i from seed + i (VBench's protocol: 5)
    seed: int = 0
    fps: float = 8  # of the written MP4s
    negative_prompt: Optional[str] = None  # null: the family's
    metrics: List[str] = field(default_factory=list)  # clip_score, fvd, vbench, digits
    clip_model: Optional[str] = None  # clip_score: a CLIP folder (transformers CLIPModel and processor)
    i3d_model: Optional[str] = None  # fvd: an I3D, TorchScript or a state dict (distill/evaluation/i3d.py)
    fvd_reference: Optional[str] = None  # fvd: a folder of reference videos (e.g. the teacher's evaluation)
    vbench_cache: Optional[str] = None  # vbench: VBENCH_CACHE_DIR with its checkpoints
    vbench_dimensions: List[str] = field(default_factory=list)  # empty: every dimension the prompts allow


@dataclass
class ValidationConfig:
    every: int = 0  # steps between validations; 0: only at the end
    num_samples: int = 16  # fixed prompts, each at a fixed seed
    seed: int = 1234
    teacher_steps: int = 50  # the teacher's reference sampling (Euler, with CFG)
    guidance_scale: Optional[float] = None  # teacher/finetune CFG; null: method.guidance_scale or 1
    metrics: bool = True  # quality metrics where the data has them (digits)
    health: HealthConfig = field(default_factory=HealthConfig)
    # a health finding (static, flat, collapsed) ends the run with a checkpoint (exit 6)
    stop_on_collapse: bool = False
    fps: int = 4  # of the saved GIFs
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


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
    # memory of each GPU, for the memory plan (plan=true); null: the local GPU's, else 80
    gpu_memory_gib: Optional[float] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = MISSING  # the config class of a registered method
    roles: Dict[str, RoleConfig] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    seed: int = 0
    # print the memory each GPU needs (distill/plan.py) and exit: nothing is built
    # on a device and the weights need not be on this machine
    plan: bool = False
    # keys a recipe needs given (non-null) -> why, e.g. the pretrained student it starts from;
    # checked before anything is built (not for a plan, which reads no weights)
    required: Dict[str, str] = field(default_factory=dict)


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def register_configs() -> None:
    # ${project_root:} in a config is this checkout's folder (shipped assets live there)
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema/role", name="role", node=RoleConfig)
    cs.store(group="schema/training", name="training", node=TrainingConfig)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/launcher", name="launcher", node=LauncherConfig)
    cs.store(group="schema/logger", name="logger", node=LoggerConfig)
    from distill.registry import FAMILIES, METHODS, load_entries

    load_entries()
    for name, method in METHODS.items():
        cs.store(group="schema/method", name=name, node=method.config_class)
    for name, family in FAMILIES.items():
        cs.store(group="schema/model", name=name, node=family.config_class)
