"""Flow-matching conventions shared by the adapters (Wan's, as in diffusers).

    x_t = (1 - sigma) * x0 + sigma * noise        sigma in [0, 1]
    v   = noise - x0                              what the network predicts
    x0  = x_t - sigma * v
    network timestep = 1000 * sigma
    shift: sigma' = s * sigma / (1 + (s - 1) * sigma)
    CFG:   uncond + w * (cond - uncond)

A method reaches a network only through these functions, so it never sees a
model family's input layout. A model family is one subclass, registered with
`distill.registry.register_family`: it owns loading (at a role's precision),
the forward with the family's extra conditioning inputs, the architecture
check against a model folder, the encoders preprocessing uses, decoding,
the export layout and, where it has one, context parallelism.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from distill.config.schema import ModelConfig

NUM_TRAIN_TIMESTEPS = 1000


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] sigma over the other dimensions of `like` [B, C, T, ...];
    a [B, T] sigma (one per latent frame) over C and the spatial dimensions."""
    if sigma.dim() == 2:
        return sigma.to(like.dtype).reshape(sigma.shape[0], 1, sigma.shape[1], *([1] * (like.dim() - 3)))
    return sigma.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def dynamic_shift(tokens: int, base_len: int, max_len: int, base_shift: float, max_shift: float) -> float:
    """exp(mu) for a sample of `tokens` packed tokens: diffusers' `calculate_shift` (mu linear
    in the tokens, as Qwen-Image's and LTX-2's pipelines use it), and the scheduler's exponential
    time shift, which equals the flow shift s sigma / (1 + (s - 1) sigma) at s = exp(mu)."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(base_shift + slope * (tokens - base_len))


@dataclass
class DynamicShiftConfig(ModelConfig):
    """The keys of a family whose pipeline shifts by the sample's size (diffusers' scheduler
    with use_dynamic_shifting): shift = exp(mu), mu linear in the family's `shift_tokens` from
    (base_image_seq_len, base_shift) to (max_image_seq_len, max_shift); the defaults are
    diffusers' scheduler's, each family sets its pipeline's. dynamic_shift false: model.shift."""

    dynamic_shift: bool = True
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


def dynamic_shift_errors(model) -> List[str]:
    if model.dynamic_shift and not model.max_image_seq_len > model.base_image_seq_len:
        return [f"model.max_image_seq_len={model.max_image_seq_len}: must exceed "
                f"model.base_image_seq_len={model.base_image_seq_len}"]
    return []


@dataclass(frozen=True)
class StockPipeline:
    """The stock diffusers pipeline that samples a family's export unchanged: what its
    model_index.json names, and which folders of the model folder the run read it needs."""

    class_name: str  # model_index.json's _class_name
    transformers: Tuple[str, ...]  # the export's network subfolders, as the pipeline names them
    parts: Tuple[str, ...]  # folders of the model folder it cannot run without (text encoder, VAE, ...)
    optional_parts: Tuple[str, ...] = ()  # linked when the model folder has them, else null
    config: Dict = field(default_factory=dict)  # the pipeline's own config entries (boundary_ratio, ...)
    # what the model card's call passes besides the prompt, steps and guidance 1 to sample a
    # few-step student (a pipeline's own extra guidances switched off), and how it reads the output
    few_step_kwargs: Dict = field(default_factory=dict)
    output: str = "video = pipe({call}).frames[0]"
    comfyui: bool = False  # the export ships ComfyUI files (a workflow, single-file weights)


class Sound(NamedTuple):
    waveforms: torch.Tensor  # [N, channels, samples] in [-1, 1]
    rate: int  # samples a second
    fps: float  # the frame rate of the video it goes with


class FlowMatchingAdapter(ABC):
    family: ClassVar[str]  # the model.family value that selects this adapter
    config_class: ClassVar[type] = ModelConfig  # its model.* keys: ModelConfig and the family's own
    vaes: ClassVar[Tuple[str, ...]] = ("identity",)  # the model.vae names it decodes with
    folder_classes: ClassVar[Tuple[str, ...]] = ()  # diffusers classes of its transformer / VAE (finds the family of a folder)
    default_negative_prompt: ClassVar[str] = ""  # what preprocessing encodes as the negative prompt
    supports_context_parallel: ClassVar[bool] = False  # parallel.context > 1 is allowed
    context_parallel_note: ClassVar[str] = ""  # why not, where there is more to say than "no plan"
    # the points the family's pipeline asks its scheduler to shift: train_min, `set_timesteps(N)`'s
    # own linspace(1, sigma_min, N) (Wan); inverse_steps, linspace(1, 1/N, N) passed as sigmas
    # (Qwen-Image, LTX-2): the exported scheduler is fitted to that call
    sigma_grid: ClassVar[str] = "train_min"

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.shift = cfg.shift
        if self.shifts_dynamically():
            self.shift = dynamic_shift(self.shift_tokens(cfg), cfg.base_image_seq_len, cfg.max_image_seq_len,
                                       cfg.base_shift, cfg.max_shift)

    def shifts_dynamically(self) -> bool:
        return isinstance(self.cfg, DynamicShiftConfig) and self.cfg.dynamic_shift

    @classmethod
    def shift_tokens(cls, model) -> int:
        """The tokens a DynamicShiftConfig's shift is computed from (the pipeline's count)."""
        raise NotImplementedError(f"model.family={cls.family} does not say how its pipeline counts tokens")

    # --- conventions -----------------------------------------------------
    def shift_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        s = self.shift
        return s * sigma / (1 + (s - 1) * sigma)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return NUM_TRAIN_TIMESTEPS * sigma

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigma, x0)
        return (1 - s) * x0 + s * noise

    def implied_noise(self, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noise that x_t = (1 - sigma) x0 + sigma noise implies for a predicted x0."""
        s = _per_sample(sigma, x_t)
        return (x_t - (1 - s) * x0) / s

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def euler_sigmas(self, steps: int) -> List[float]:
        """`steps` evenly spaced sigmas from 1 (exclusive of 0), shifted: the ODE sampler's grid."""
        return self.shift_sigma(torch.linspace(1.0, 0.0, steps + 1)[:-1]).tolist()

    @property
    def latent_shape(self) -> tuple:
        """A sample's shape in model space (`sample_shape` of this config)."""
        return self.sample_shape(self.cfg)

    @classmethod
    def sample_shape(cls, model) -> Tuple[int, ...]:
        """A sample's shape in model space, what the data holds and samplers draw: the latent
        shape; a joint family's streams flattened side by side (LTX-2's video and audio)."""
        return tuple(model.latent_shape)

    # --- latent streams --------------------------------------------------
    # A method's losses are per stream: a family whose samples are one latent has one,
    # `latents`; a joint one (LTX-2) names each, views of the model-space tensor.
    def streams(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"latents": x}

    def join_streams(self, parts: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of `streams`."""
        return parts["latents"]

    def stream_weights(self) -> Dict[str, float]:
        """Each stream's weight in a loss summed over streams."""
        return {"latents": 1.0}

    # --- predictions -----------------------------------------------------
    # `cond` holds the family's extra conditioning inputs (see `conditioning`)
    def predict_velocity(self, role, x_t: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, **cond) -> torch.Tensor:
        """The role's velocity prediction, in float32."""
        with role.compute():
            v = self.forward(role.module, x_t, self.timestep(sigma), text, **cond)
        return self.held_velocity(v.float(), x_t, sigma, cond)

    def held_velocity(self, v: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The velocity with what the conditioning holds fixed put back (e.g. a clean first frame)."""
        return v

    def predict_with_features(self, role, x_t: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                              blocks: List[int], **cond) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The velocity (float32) and the outputs of the listed blocks of the role's
        network ([B, tokens, hidden] each; negative indices count from the end),
        caught by forward hooks on `blocks(module)` for the length of one forward."""
        chosen = [self.blocks(role.module)[i] for i in blocks]
        caught: Dict[int, torch.Tensor] = {}

        def keeper(k):
            def keep(module, args, output):
                caught.setdefault(k, self.block_tokens(output))
            return keep

        hooks = [block.register_forward_hook(keeper(k)) for k, block in enumerate(chosen)]
        try:
            v = self.predict_velocity(role, x_t, sigma, text, **cond)
        finally:
            for hook in hooks:
                hook.remove()
        # under context parallelism a block sees its rank's tokens; what a method computes
        # from features sees all of them, the same on every rank of the group
        return v, [self.gather_tokens(role.module, caught[k]) for k in range(len(chosen))]

    def predict_x0(self, role, x_t: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, **cond) -> torch.Tensor:
        v = self.predict_velocity(role, x_t, sigma, text, **cond)
        return x_t.float() - _per_sample(sigma, v) * v

    def predict_x0_cfg(
        self, role, x_t: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor, scale: float,
        **cond,
    ) -> torch.Tensor:
        """Guided x0 = uncond + scale * (cond - uncond); the scale of each sample is the
        family's `guidance` (Wan's two experts have one each)."""
        cond_x0, unc = self.predict_x0_pair(role, x_t, sigma, text, uncond, **cond)
        return unc + self.guidance(sigma, scale, like=unc) * (cond_x0 - unc)

    def predict_x0_pair(self, role, x_t: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                        **cond) -> Tuple[torch.Tensor, torch.Tensor]:
        """The conditional and unconditional x0, both halves in one batch."""
        doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
        x0 = self.predict_x0(role, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([text, uncond]), **doubled)
        return x0.chunk(2)

    def guidance(self, sigma: torch.Tensor, scale: float, like: torch.Tensor):
        """The CFG scale of each sample (a float, or a tensor broadcasting over `like`)."""
        return scale

    def conditioning(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The extra forward inputs taken from a batch (none for text-to-video)."""
        return {}

    def conditioning_image(self, cond: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The conditioning image's latent [B, C, 1, H, W] among a forward's inputs, or None."""
        return None

    @classmethod
    def task(cls, model) -> str:
        """The Hugging Face pipeline tag of an export of this model config."""
        return "text-to-video"

    @classmethod
    def first_frame_of(cls, model, latents: torch.Tensor) -> torch.Tensor:
        """The first latent frame [B, C, 1, H, W] of a batch of samples (laid out as
        `sample_shape`) or of image latents: a video's own image for first-frame conditioning."""
        return latents[:, :, :1]

    @classmethod
    def image_latent_shape(cls, model) -> Tuple[int, ...]:
        """The shape of an image-to-video dataset's first_frame_latent column: by default the
        image followed by black frames through the VAE, laid out as a sample."""
        return tuple(cls.sample_shape(model))

    @classmethod
    def batch_condition(cls, model) -> str:
        """Which image-conditioning columns the data carries for this model config:
        none, first_frame (the image's latent) or concat (image latent and embeddings)."""
        return "none"

    def block_tokens(self, output) -> torch.Tensor:
        """A block's output tokens [B, tokens, D] (the features heads read) from what it returns."""
        return output[0] if isinstance(output, tuple) else output

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's latents back to the VAE's (the data loader applied (x - mean) / std)."""
        mean, std = self._stats(latents)
        return latents if mean is None else latents * std + mean

    def _stats(self, like: torch.Tensor):
        if self.cfg.latents_mean is None:
            return None, None
        shape = (1, -1) + (1,) * (like.dim() - 2)
        mean = torch.tensor(list(self.cfg.latents_mean), device=like.device, dtype=like.dtype).reshape(shape)
        std = torch.tensor(list(self.cfg.latents_std), device=like.device, dtype=like.dtype).reshape(shape)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents [N, C, T, H, W] -> pixels in [-1, 1]."""
        if self.cfg.vae == "identity":
            return latents.float()
        return self.decode_with_vae(self.denormalise(latents.float()))

    def decode_audio(self, latents: torch.Tensor) -> Optional["Sound"]:
        """The sound of samples that carry it, or None for a family or config without sound."""
        return None

    def encode_prompts(self, prompts: List[str], device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """Prompts -> text embeddings [N, text_len, text_dim], zero-padded as the data loader pads them."""
        if self.cfg.text_encoder == "hash":
            from distill.data.hash_text import HashTextEncoder

            texts = HashTextEncoder(self.cfg.text_dim, self.cfg.text_len).batch(prompts)
        else:
            texts = self.text_encoder(device).text(prompts)
        out = torch.zeros(len(prompts), self.cfg.text_len, self.cfg.text_dim)
        for i, text in enumerate(texts):
            out[i, : min(len(text), self.cfg.text_len)] = text[: self.cfg.text_len]
        return out.to(device)

    # --- what each family supplies ---------------------------------------
    def text_encoder(self, device: torch.device):
        """The family's prompt encoder from model.path (`.text(prompts)` -> unpadded [L, D] each)."""
        raise NotImplementedError(f"{type(self).__name__} has no text encoder: set model.text_encoder=hash")

    @classmethod
    def check(cls, config) -> List[str]:
        """Errors of the model config and every role's weights against this family
        (architecture read from the model folders), each naming its key."""
        return []

    @classmethod
    def role_architecture(cls, config, name: str) -> Tuple[Optional[dict], str, Optional[str]]:
        """roles.<name>'s network architecture as its config states it, read without
        loading weights: (arch or None when unknown, the key it comes from, an error)."""
        return None, "", None

    @classmethod
    def depth(cls, arch: dict) -> Optional[int]:
        """The number of blocks `arch` has (what block indices may name); None: unknown."""
        return None

    @classmethod
    def layer_names(cls, arch: dict) -> Optional[List[str]]:
        """Full names of the layers LoRA may adapt in a network of `arch`; None: unknown."""
        return None

    def decode_with_vae(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no VAE decoder")

    def set_attention_backend(self, module: nn.Module) -> None:
        """model.attention_backend on every diffusers network in the role (both experts of a pair),
        and nowhere else: diffusers also makes it the process's default for every network built
        later (a test worker's next runs measured math attention's memory), so that default is
        put back; each processor of the role names its backend itself."""
        if self.cfg.attention_backend is None:
            return
        from diffusers import ModelMixin
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        default = _AttentionBackendRegistry.get_active_backend()[0]
        for network in module.modules():
            if isinstance(network, ModelMixin):
                network.set_attention_backend(self.cfg.attention_backend)
        _AttentionBackendRegistry.set_active_backend(default)

    def freeze_untrained(self, module: nn.Module) -> nn.Module:
        """Freeze the parts of a trainable role's network the model config keeps as loaded."""
        return module

    def trains_part(self) -> bool:
        """Whether a trainable role trains only part of its network (so the rest is loaded, not saved)."""
        return False

    def lora_targets(self) -> List[str]:
        """Module names LoRA adapts when roles.<r>.lora.target_modules is null."""
        raise NotImplementedError(f"{type(self).__name__} names no LoRA targets: set roles.<r>.lora.target_modules")

    def save_lora(self, module: nn.Module, folder: Path) -> None:
        """Write a LoRA network's adapters where the family's diffusers pipeline loads them."""
        raise NotImplementedError(f"{type(self).__name__} cannot export LoRA weights")

    def load_lora(self, module: nn.Module, folder: Path) -> nn.Module:
        """Add the adapters `save_lora` wrote to a base network."""
        raise NotImplementedError(f"{type(self).__name__} cannot load LoRA weights")

    def encoders(self, folder: Path, text_only: bool, max_text_len: int, device: torch.device, image: bool = False):
        """The text encoder and VAE preprocessing uses (`.text(captions)`, `.video(clips)`), and
        with `image` the image encoder where the model has one (`.image_encoder`, `.image(frames)`)."""
        raise NotImplementedError(f"{type(self).__name__} has no preprocessing encoders")

    @abstractmethod
    def forward(self, module: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                **cond) -> torch.Tensor:
        """Run the network: latents [B, C, T, H, W], timestep [B], text [B, L, D], the family's
        extra inputs -> velocity."""

    @abstractmethod
    def load(self, path: Optional[str], seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The network from a diffusers folder at `dtype` (modules the family keeps in
        fp32 stay fp32), or built from cfg.arch when path is None."""

    @abstractmethod
    def empty(self, path: Optional[str], dtype: torch.dtype = torch.float32) -> nn.Module:
        """The network's architecture only, with `load`'s dtypes (call under a meta-device context)."""

    @abstractmethod
    def blocks(self, module: nn.Module) -> list:
        """The repeated blocks: the units of sharding and activation checkpointing,
        and where `predict_with_features` reads features."""

    def make_causal(self, module: nn.Module) -> nn.Module:
        """Block-causal self-attention over chunks of model.chunk_frames latent frames,
        with a KV cache for chunk-by-chunk generation (roles.<r>.causal)."""
        raise NotImplementedError(f"{type(self).__name__} has no block-causal variant")

    def generation_cache(self, role):
        """A context manager over a causal role's KV cache for chunk-by-chunk generation;
        it yields a handle with `frame_offset` (latent frames before the chunk run next)
        and `write` (whether that forward's keys and values join the cache)."""
        raise NotImplementedError(f"{type(self).__name__} has no block-causal variant")

    def install_context_parallel(self, module: nn.Module, runtime) -> nn.Module:
        """Split the network's token sequence over the ranks of each context group
        (before sharding): every rank of a group gets the same inputs and the same
        full output, and back-propagates through its own tokens only."""
        raise NotImplementedError(f"{type(self).__name__} has no context parallelism")

    def gather_tokens(self, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """A block's [B, tokens, D] features whole on every rank (the identity without context parallelism)."""
        return tokens

    def tokens_per_sample(self, module: nn.Module) -> int:
        """Tokens per sample in the network's blocks (for the memory plan)."""
        raise NotImplementedError(f"{type(self).__name__} cannot plan memory")

    def activation_bytes(self, module: nn.Module, tokens: int, samples: int, element_bytes: int,
                         checkpointing: bool, grad: bool) -> Tuple[float, float]:
        """(kept, transient) activation bytes of one forward over `samples` samples of
        `tokens` tokens (per rank) at `element_bytes` per compute element: what stays
        for the backward (with `grad`), and the most one block adds while it runs."""
        raise NotImplementedError(f"{type(self).__name__} cannot plan memory")

    def hidden_size(self, module: nn.Module) -> int:
        """The width of a block's output (the features `predict_with_features` returns)."""
        raise NotImplementedError(f"{type(self).__name__} does not say its hidden size")

    def save_single_file(self, module: nn.Module, folder: Path) -> List[Path]:
        """Each network as one file in the family's original (non-diffusers) key layout."""
        raise NotImplementedError(f"model.family={self.family} has no single-file layout")

    def comfyui_workflow(self, sigmas: List[float], network_file: str, deterministic: bool = False) -> Optional[Dict]:
        """A ComfyUI workflow (API format, core nodes) sampling the exported few-step
        network `network_file` at `sigmas` (re-noising, or by Euler steps when
        `deterministic`), or None where the family has none."""
        return None

    def euler_scheduler(self) -> Dict:
        """FlowMatchEulerDiscreteScheduler keys that sample the base model's ODE as its pipeline does."""
        if self.shifts_dynamically():
            c = self.cfg
            return {"use_dynamic_shifting": True, "time_shift_type": "exponential", "base_shift": c.base_shift,
                    "max_shift": c.max_shift, "base_image_seq_len": c.base_image_seq_len,
                    "max_image_seq_len": c.max_image_seq_len}
        return {"shift": self.shift}

    def stock_pipeline(self) -> Optional[StockPipeline]:
        """The stock diffusers pipeline that samples this family's exported student from
        prompts, or None where no stock one can (no text encoder or VAE of its own)."""
        return None

    @abstractmethod
    def save(self, module: nn.Module, folder: Path) -> None:
        """Write a network in the family's diffusers layout under `folder`, so that
        `load(folder)` reads it back."""
