"""Wan2.1 through diffusers' WanTransformer3DModel (text-to-video)."""

import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from distill.models import context_parallel, image_condition
from distill.models.causal_wan import KVCache, frame_timesteps, kv_cache, make_causal
from distill.models.experts import ExpertPair, high_noise
from distill.models.diffusers_network import DiffusersNetworkAdapter
from distill.models.flow_matching import NUM_TRAIN_TIMESTEPS, StockPipeline
from distill.models.wan_config import WanConfig
from distill.models.folders import read_component_config, resolve_model_folder
from distill.models.wan_original import comfy_lora, to_original
from distill.registry import register_family

LOW_NOISE_SUBFOLDER = "transformer_2"  # Wan2.2 A14B's second expert
COMFY_LORA_FILE = "comfyui_lora.safetensors"

# the attention (self and cross) and FFN projections of every block
DIFFUSERS_DEFAULT_LAYERS = 40  # WanTransformer3DModel's num_layers when a config.json leaves it out
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


# The transformer/config.json of the public checkpoints, so that a memory plan
# (plan=true) can be made where the weights are not
_WAN21 = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
PUBLIC_ARCHITECTURES = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": dict(_WAN21, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": dict(_WAN21, num_attention_heads=24, ffn_dim=14336, num_layers=30,
                                            in_channels=48, out_channels=48),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40),  # each expert
    **{f"Wan-AI/Wan2.1-I2V-14B-{p}-Diffusers": dict(_WAN21, num_attention_heads=40, ffn_dim=13824, num_layers=40,
                                                    in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
       for p in ("480P", "720P")},
}

# Activation memory of one Wan block, forward + backward, per token, measured with
# torch's MemTracker on the CPU (diffusers 0.42): bytes per unit of hidden size and
# per unit of FFN width, by compute precision (element bytes). The bf16 figures give
# 5.04 GiB for a 1.3B block at 32,760 tokens; an H100 measured 5.0 GiB.
BLOCK_BYTES = {4: (100.7, 11.9), 2: (84.7, 3.9)}
STORED_FRACTION = 0.815  # of a block's peak, what stays for the backward (no checkpointing)
NO_GRAD_FRACTION = 0.366  # of a block's peak, a forward without gradient (one block at a time)
CHECKPOINT_ELEMENTS = 1.67  # per token and hidden unit, what a checkpointed block keeps (its input)

# Wan's standard negative prompt (Wan2.1's sample_neg_prompt, as FastVideo and
# Self-Forcing encode it for the real score's classifier-free guidance)
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@register_family
class WanAdapter(DiffusersNetworkAdapter):
    family = "wan"
    model_class_name = "WanTransformer3DModel"
    lora_pipeline_name = "WanPipeline"
    vae_class_name = "AutoencoderKLWan"
    public_architectures = PUBLIC_ARCHITECTURES
    tuple_keys = ("patch_size",)
    default_depth = DIFFUSERS_DEFAULT_LAYERS
    config_class = WanConfig
    vaes = ("wan", "identity")
    folder_classes = ("WanTransformer3DModel", "AutoencoderKLWan")
    default_negative_prompt = WAN_NEGATIVE_PROMPT
    supports_context_parallel = True

    def held_velocity(self, v: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        if self.cfg.image_condition.value == "first_frame":  # the first frame's x0 is the image latent
            return image_condition.first_frame_velocity(v, x_t, cond[image_condition.KEY], sigma)
        return v

    def guidance(self, sigma: torch.Tensor, scale: float, like: torch.Tensor):
        """`scale`, or with two experts model.low_noise_guidance_scale below the boundary."""
        low = self.cfg.low_noise_guidance_scale
        if self.cfg.boundary_ratio is None or low is None:
            return scale
        high = high_noise(self.timestep(sigma), self.cfg.boundary_ratio * NUM_TRAIN_TIMESTEPS)
        per_sample = torch.where(high, scale, low)
        return per_sample.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def conditioning(self, batch):
        """The image latent for first-frame image-to-video; the image latent and its CLIP
        embeddings for concat (distill/models/image_condition.py)."""
        mode = self.cfg.image_condition.value
        if mode == "first_frame":
            return {image_condition.KEY: batch[image_condition.KEY]}
        if mode == "concat":
            return {k: batch[k] for k in (image_condition.IMAGE_LATENT, image_condition.IMAGE_EMBEDS)}
        return {}

    def conditioning_image(self, cond):
        return image_condition.image_of(cond)

    @classmethod
    def batch_condition(cls, model) -> str:
        return model.image_condition.value

    @classmethod
    def task(cls, model) -> str:
        return "text-to-video" if model.image_condition.value == "none" else "image-to-video"

    def forward(self, module: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                **cond) -> torch.Tensor:
        dtype = (module.high if isinstance(module, ExpertPair) else module).patch_embedding.weight.dtype
        first_frame = cond.pop(image_condition.KEY, None)
        if first_frame is not None:  # as diffusers' pipelines with expand_timesteps (Wan2.2 TI2V)
            x_t = image_condition.hold_first_frame(x_t, first_frame)
            timestep = image_condition.first_frame_timesteps(timestep, x_t.shape[2])
        image_latent = cond.pop(image_condition.IMAGE_LATENT, None)
        if image_latent is not None:  # as WanImageToVideoPipeline (Wan2.1 I2V)
            x_t = image_condition.concat_inputs(x_t, image_latent)
            cond["encoder_hidden_states_image"] = cond.pop(image_condition.IMAGE_EMBEDS).to(dtype)
        return module(
            hidden_states=x_t.to(dtype),
            timestep=frame_timesteps(timestep, x_t, module.config.patch_size),  # [B] or one per latent frame
            encoder_hidden_states=text.to(dtype),
            return_dict=False,
            **cond,
        )[0]

    def load(self, path: Optional[str], seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
        if self.cfg.boundary_ratio is not None:  # Wan2.2 A14B: transformer, transformer_2
            return self._pair(*(super(WanAdapter, self).load(path, seed + i, dtype, sub)
                                for i, sub in enumerate(self._subfolders())))
        return super().load(path, seed, dtype)

    def _subfolders(self):
        return self.cfg.subfolder, LOW_NOISE_SUBFOLDER

    def _pair(self, high: nn.Module, low: nn.Module) -> ExpertPair:
        return ExpertPair(high, low, self.cfg.boundary_ratio * 1000)

    def empty(self, path: Optional[str], dtype: torch.dtype = torch.float32) -> nn.Module:
        if self.cfg.boundary_ratio is not None:
            return self._pair(*(super(WanAdapter, self).empty(path, dtype, sub) for sub in self._subfolders()))
        return super().empty(path, dtype)

    def freeze_untrained(self, module: nn.Module) -> nn.Module:
        """A trainable expert pair trains model.trained_experts; the other expert stays as loaded."""
        if isinstance(module, ExpertPair):
            for name, expert in module.experts():
                if name not in self.cfg.trained_experts:
                    expert.requires_grad_(False)
        return module

    def trains_part(self) -> bool:
        return self.cfg.boundary_ratio is not None and set(self.cfg.trained_experts) != {"high", "low"}

    def tokens_per_sample(self, module: nn.Module) -> int:
        return self.tokens(self.cfg.latent_shape, module.config.patch_size)

    def activation_bytes(self, module: nn.Module, tokens: int, samples: int, element_bytes: int,
                         checkpointing: bool, grad: bool) -> Tuple[float, float]:
        """(kept, transient) activation bytes of one forward over `samples` samples of
        `tokens` tokens each (per rank): kept until the backward (with `grad`), and
        the most one block adds at a time (its forward, or its recompute and backward)."""
        c = module.config
        hidden = c.num_attention_heads * c.attention_head_dim
        per_hidden, per_ffn = BLOCK_BYTES[element_bytes]
        block = tokens * samples * (per_hidden * hidden + per_ffn * c.ffn_dim)
        if not grad:
            return 0.0, NO_GRAD_FRACTION * block
        if checkpointing:
            return c.num_layers * tokens * samples * hidden * CHECKPOINT_ELEMENTS * element_bytes, block
        return c.num_layers * STORED_FRACTION * block, (1 - STORED_FRACTION) * block

    def blocks(self, module: nn.Module) -> list:
        if isinstance(module, ExpertPair):
            return [block for _, expert in module.experts() for block in expert.blocks]
        return list(module.blocks)

    def make_causal(self, module: nn.Module) -> nn.Module:
        """Block-causal self-attention over chunks of model.chunk_frames latent frames
        (distill/models/causal_wan.py), with a KV cache for generation."""
        return make_causal(module, self.cfg.chunk_frames)

    def generation_cache(self, role):
        return kv_cache(role.module, KVCache())

    def install_context_parallel(self, module: nn.Module, runtime) -> nn.Module:
        """diffusers' own Wan plan and Ulysses attention (distill/models/context_parallel.py)."""
        if isinstance(module, ExpertPair):  # each expert splits and gathers its own sequence
            for _, expert in module.experts():
                context_parallel.install(expert, runtime)
            module._parallel_config = module.high._parallel_config
            return module
        return context_parallel.install(module, runtime)

    def gather_tokens(self, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return context_parallel.gather_tokens(module, tokens)

    def save(self, module: nn.Module, folder: Path) -> None:
        if isinstance(module, ExpertPair):  # both, as WanPipeline(transformer, transformer_2) loads them
            for (_, expert), sub in zip(module.experts(), self._subfolders()):
                expert.save_pretrained(Path(folder) / sub)
            return
        module.save_pretrained(Path(folder) / self.cfg.subfolder)

    def stock_pipeline(self) -> Optional[StockPipeline]:
        """WanPipeline, or WanImageToVideoPipeline for image conditioning (with Wan2.1 I2V's
        CLIP encoder where the folder has one); both networks for two experts. None for
        the hash-text, identity-VAE models (the digits demo, tiny plumbing)."""
        if self.cfg.vae != "wan" or self.cfg.text_encoder != "family":
            return None
        condition = self.cfg.image_condition.value
        return StockPipeline(
            class_name="WanPipeline" if condition == "none" else "WanImageToVideoPipeline",
            transformers=self._subfolders() if self.cfg.boundary_ratio is not None else (self.cfg.subfolder,),
            parts=("tokenizer", "text_encoder", "vae"),
            optional_parts=("image_encoder", "image_processor") if condition != "none" else (),  # Wan2.1 I2V's
            config={"boundary_ratio": self.cfg.boundary_ratio, "expand_timesteps": condition == "first_frame"},
            comfyui=True,
            output="video = pipe({call}" + (", image=image" if condition != "none" else "") + ").frames[0]",
        )

    def comfyui_workflow(self, sigmas: List[float], network_file: str, deterministic: bool = False) -> Optional[dict]:
        """Text-to-video with one network only (two experts need two samplers, image
        conditioning its own nodes: not written)."""
        if self.stock_pipeline() is None or self.cfg.image_condition.value != "none" or self.cfg.boundary_ratio:
            return None
        from distill.models.wan_comfyui import workflow

        return workflow(sigmas, list(self.cfg.latent_shape), network_file, deterministic=deterministic)

    def lora_targets(self) -> List[str]:
        return list(WAN_LORA_TARGETS)

    def save_lora(self, module: nn.Module, folder: Path) -> None:
        """diffusers' Wan LoRA format (`WanPipeline.load_lora_weights(folder)` reads it), and
        beside it the same adapters in the original-key layout with alpha tensors
        (`comfyui_lora.safetensors`), which ComfyUI's LoRA loader and diffusers both read."""
        from safetensors.torch import save_file

        from distill.lora import adapter_metadata, adapter_state

        super().save_lora(module, folder)
        alpha, state = adapter_metadata(module)["lora_alpha"], adapter_state(module)
        files = {COMFY_LORA_FILE: state}
        if isinstance(module, ExpertPair):  # one file per expert, as ComfyUI loads each model alone
            files = {COMFY_LORA_FILE.replace(".", f"_{name}_noise."): {k.split(".", 1)[1]: v for k, v in state.items()
                                                                        if k.startswith(f"{name}.")}
                     for name, _ in module.experts()}
        for file, part in files.items():
            try:
                comfy = comfy_lora(part, alpha)
            except KeyError as err:  # a target chosen in lora.target_modules that the original layout lacks
                print(f"{folder}: no {file} ({err.args[0]}); the diffusers file holds every adapter", file=sys.stderr)
                continue
            if comfy:
                save_file(comfy, str(Path(folder) / file))

    def save_single_file(self, module: nn.Module, folder: Path) -> List[Path]:
        """Each network as one safetensors file in Wan's original key layout (ComfyUI's
        diffusion-model loader; `WanTransformer3DModel.from_single_file`)."""
        from safetensors.torch import save_file

        nets = module.experts() if isinstance(module, ExpertPair) else [(None, module)]
        written = []
        for (_, net), sub in zip(nets, self._subfolders()):
            path = Path(folder) / f"{sub}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in to_original(net.state_dict()).items()}, str(path))
            written.append(path)
        return written

    @classmethod
    def check(cls, config) -> List[str]:
        model = config.model
        if len(model.latent_shape) != 4:
            return [f"model.latent_shape={list(model.latent_shape)}: must be [C, T, H, W]"]
        errors = []
        causal = [name for name, role in config.roles.items() if role.causal]
        if model.chunk_frames and not causal:
            errors.append(f"model.chunk_frames={model.chunk_frames}: no role is causal (set roles.<r>.causal=true, "
                          "or model.chunk_frames=null)")
        if model.chunk_frames is not None and model.chunk_frames < 1:
            errors.append(f"model.chunk_frames={model.chunk_frames}: must be >= 1")
        if causal and not model.chunk_frames:
            errors.append(f"roles.{causal[0]}.causal=true needs model.chunk_frames (latent frames per chunk), "
                          f"got {model.chunk_frames}")
        errors += cls.check_experts(config)
        if model.image_condition.value == "first_frame" and model.latent_shape[1] < 2:
            errors.append(f"model.image_condition=first_frame with model.latent_shape={list(model.latent_shape)}: "
                          "the video needs latent frames after the image's")
        if causal and model.image_condition.value != "none":
            errors.append(f"roles.{causal[0]}.causal=true with model.image_condition={model.image_condition.value}: "
                          "the block-causal Wan is text-to-video only")
        if causal and config.parallel.context > 1:
            errors.append(f"roles.{causal[0]}.causal=true with parallel.context={config.parallel.context}: "
                          "the block-causal Wan has no context parallelism")
        for name in config.roles:
            arch, source, error = cls.role_architecture(config, name)
            if error:
                errors.append(error)
                continue
            errors += cls.check_arch(arch, model, source)
            errors += cls.check_context_parallel(arch, model, config.parallel.context, source)
        return list(dict.fromkeys(errors))

    @classmethod
    def role_architecture(cls, config, name: str) -> Tuple[Optional[dict], str, Optional[str]]:
        """The transformer's config.json, and with two experts the low-noise one's beside it."""
        arch, key, error = super().role_architecture(config, name)
        model = config.model
        if error is None and key != "model.arch" and model.boundary_ratio is not None and not (
                config.plan and resolve_model_folder(config.roles[name].path or model.path, model.subfolder) is None):
            _, error = read_component_config(config.roles[name].path or model.path, LOW_NOISE_SUBFOLDER, key)
            if error:
                error = f"{error} (model.boundary_ratio={model.boundary_ratio}: two experts)"
        return arch, key, error

    @classmethod
    def check_experts(cls, config) -> List[str]:
        model = config.model
        if model.boundary_ratio is None:
            return [] if model.low_noise_guidance_scale is None else [
                f"model.low_noise_guidance_scale={model.low_noise_guidance_scale} needs two experts (model.boundary_ratio)"]
        errors = []
        if not 0 < model.boundary_ratio < 1:
            errors.append(f"model.boundary_ratio={model.boundary_ratio}: must be in (0, 1)")
        trained = list(model.trained_experts)
        if not trained or len(set(trained)) != len(trained) or not set(trained) <= {"high", "low"}:
            errors.append(f"model.trained_experts={trained}: one or both of high, low")
        for name, role in config.roles.items():
            if role.causal:
                errors.append(f"roles.{name}.causal=true with model.boundary_ratio: the block-causal Wan has one expert")
            if role.lora.rank > 0:
                errors.append(f"roles.{name}.lora.rank={role.lora.rank} with model.boundary_ratio: LoRA on two "
                              "experts is not supported; train the experts' full weights")
        gan = getattr(config.method, "gan", None)
        if gan is not None and gan.enabled:
            errors.append("method.gan.enabled=true with model.boundary_ratio: the GAN head reads one network's "
                          "block features; two experts have two")
        return errors

    @classmethod
    def check_context_parallel(cls, arch: dict, model, cp: int, key: str) -> List[str]:
        """Ulysses gives each rank heads/cp whole heads, and each rank tokens/cp tokens."""
        if cp == 1:
            return []
        errors = []
        heads = arch.get("num_attention_heads")
        if heads is not None and heads % cp:
            errors.append(f"parallel.context={cp} does not divide num_attention_heads={heads} of {key}: "
                          "Ulysses gives each rank whole heads")
        tokens = cls.tokens(model.latent_shape, arch.get("patch_size") or (1, 2, 2))
        if tokens % cp:
            errors.append(f"parallel.context={cp} does not divide the {tokens} tokens of "
                          f"model.latent_shape={list(model.latent_shape)}")
        return errors

    @staticmethod
    def tokens(latent_shape, patch_size) -> int:
        """Tokens per sample after patch embedding."""
        _, t, h, w = latent_shape
        pt, ph, pw = patch_size
        return (t // pt) * (h // ph) * (w // pw)

    @classmethod
    def check_arch(cls, arch: dict, model, key: str) -> List[str]:
        errors = []
        if "text_dim" in arch and arch["text_dim"] != model.text_dim:
            errors.append(f"model.text_dim={model.text_dim} does not match text_dim={arch['text_dim']} of {key}")
        if model.image_condition.value == "concat" and not arch.get("image_dim"):
            errors.append(f"model.image_condition=concat: {key} has no image projection (image_dim is null); "
                          "Wan2.1-I2V checkpoints have one")
        if "in_channels" in arch and arch["in_channels"] != cls.in_channels(model):
            errors.append(
                f"in_channels={arch['in_channels']} of {key} does not fit model.latent_shape[0]="
                f"{model.latent_shape[0]}: model.family={cls.family} needs in_channels={cls.in_channels(model)}"
            )
        return errors

    @classmethod
    def in_channels(cls, model) -> int:
        """The transformer's input channels for the model's latents (concat image
        conditioning adds the mask and the image latent)."""
        c = model.latent_shape[0]
        return 2 * c + image_condition.MASK_CHANNELS if model.image_condition.value == "concat" else c

    def encoders(self, folder: Path, text_only: bool, max_text_len: int, device: torch.device, image: bool = False):
        return WanEncoders(Path(folder), text_only, max_text_len, device, image)

    @torch.no_grad()
    def text_encoder(self, device: torch.device) -> "WanEncoders":
        """umT5 and its tokenizer from <model.path>/text_encoder and /tokenizer."""
        return WanEncoders(self.part_folder("text_encoder"), text_only=True, max_text_len=self.cfg.text_len,
                           device=device)

class WanEncoders:
    """umT5 (with its tokenizer) and the Wan VAE from a diffusers Wan folder; with
    `image`, its CLIP image encoder and processor where the folder has them (Wan2.1 I2V)."""

    def __init__(self, model: Path, text_only: bool, max_text_len: int, device: torch.device, image: bool = False):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.device = device
        self.max_text_len = max_text_len
        self.tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
        self.text_encoder = UMT5EncoderModel.from_pretrained(model / "text_encoder").to(device).eval()
        self.vae = None
        if not text_only:
            from diffusers import AutoencoderKLWan

            self.vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae").to(device).eval()
        self.image_encoder = None
        if image and (model / "image_encoder").is_dir():
            from transformers import CLIPImageProcessor, CLIPVisionModel

            self.image_encoder = CLIPVisionModel.from_pretrained(model / "image_encoder").to(device).eval()
            self.image_processor = CLIPImageProcessor.from_pretrained(model / "image_processor")

    @torch.no_grad()
    def text(self, captions: List[str]) -> List[torch.Tensor]:
        """Each caption's embedding with padding removed, [L, D]."""
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.max_text_len, truncation=True, return_tensors="pt"
        ).to(self.device)
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        return [h[:n].float().cpu() for h, n in zip(hidden, lengths)]

    @torch.no_grad()
    def image(self, frames: torch.Tensor) -> List[torch.Tensor]:
        """Frames [N, H, W, 3] uint8 -> the CLIP encoder's penultimate hidden states [tokens, D]
        each, what WanImageToVideoPipeline feeds the transformer's image projection."""
        from PIL import Image

        pixels = self.image_processor(images=[Image.fromarray(f.numpy()) for f in frames], return_tensors="pt")
        hidden = self.image_encoder(pixel_values=pixels.pixel_values.to(self.device), output_hidden_states=True)
        return [h.float().cpu() for h in hidden.hidden_states[-2]]

    @torch.no_grad()
    def video(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips [N, 3, F, H, W] in [-1, 1] -> the VAE posterior mean, un-normalised."""
        return self.vae.encode(clips.to(self.device)).latent_dist.mean.float().cpu()
