"""Qwen-Image through diffusers' QwenImageTransformer2DModel (text-to-image).

An image is a one-frame latent [C, 1, H, W] everywhere outside this file, as
AutoencoderKLQwenImage writes it; the transformer reads it packed, each 2x2
patch of latent pixels one token of 4C channels (QwenImagePipeline's
`_pack_latents`), and returns the velocity in the same packed layout. The
network's timestep input is sigma itself (the pipeline passes t / 1000), and
the text mask is where the zero-padded embeddings are non-zero: the data pads
each prompt's embedding with zeros, and a real token's embedding is never all
zeros, so the transformer attends to exactly the tokens the pipeline's mask
keeps.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from distill.models import context_parallel
from distill.models.diffusers_network import DiffusersNetworkAdapter
from distill.models.flow_matching import DynamicShiftConfig, StockPipeline, dynamic_shift_errors
from distill.registry import register_family

PATCH = 2  # QwenImagePipeline packs 2x2 latent pixels into one token

# QwenImageTransformer2DModel's linear layers in every block: both streams' attention
# projections and both streams' MLPs (the image stream's and the text stream's)
QWEN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]

# Qwen/Qwen-Image's transformer/config.json, so that a memory plan (plan=true) can be
# made where the weights are not: 60 double-stream blocks of 24 heads x 128
PUBLIC_ARCHITECTURES = {
    "Qwen/Qwen-Image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                            axes_dims_rope=[16, 56, 56]),
}


@dataclass
class QwenImageConfig(DynamicShiftConfig):
    family: str = "qwen_image"
    latent_shape: List[int] = field(default_factory=lambda: [16, 1, 166, 166])  # 1328x1328 through the 8x VAE
    text_len: int = 512  # QwenImagePipeline's max_sequence_length default (it allows up to 1024)
    text_dim: int = 3584  # Qwen2.5-VL-7B's hidden size (the transformer's joint_attention_dim)
    vae: str = "qwen_image"  # qwen_image: AutoencoderKLQwenImage from <model.path>/vae; identity: none
    text_encoder: str = "family"  # Qwen2.5-VL from <model.path>/text_encoder, the pipeline's prompt template
    # resolution-dependent shift as QwenImagePipeline samples, from the packed image tokens
    # (Qwen/Qwen-Image scheduler/scheduler_config.json; its 256 tokens and 0.5 are the defaults)
    max_image_seq_len: int = 8192
    max_shift: float = 0.9


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] -> [B, (H/2)(W/2), 4C], QwenImagePipeline's token layout."""
    b, c, frames, h, w = latents.shape
    x = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, 1, H, W], the inverse of `pack`."""
    b, _, channels = tokens.shape
    x = tokens.reshape(b, height // PATCH, width // PATCH, channels // (PATCH * PATCH), PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // (PATCH * PATCH), 1, height, width)


@register_family
class QwenImageAdapter(DiffusersNetworkAdapter):
    family = "qwen_image"
    model_class_name = "QwenImageTransformer2DModel"
    lora_pipeline_name = "QwenImagePipeline"
    vae_class_name = "AutoencoderKLQwenImage"
    public_architectures = PUBLIC_ARCHITECTURES
    tuple_keys = ("axes_dims_rope",)
    default_depth = 60
    # Activation memory of one double-stream block, forward + backward, per token (image
    # and text: the two streams run side by side) and unit of width, measured as live
    # tensor bytes on the CPU by benchmarks/family_activations.py (1,024 image + 64 text
    # tokens, width 512; the same script gives Wan's BLOCK_BYTES within 3%): bytes by
    # compute precision (element bytes), and what stays for the backward, or a forward
    # without gradient adds, as fractions of that peak
    block_bytes = {4: 133.7, 2: 78.0}
    stored_fraction = 0.715  # 0.708 fp32, 0.725 bf16
    no_grad_fraction = 0.40  # 0.419 fp32, 0.374 bf16
    # a checkpointed block keeps its two streams' inputs (one element per token and width)
    # and 2.36 bytes more per token and width (the same in fp32 and bf16)
    checkpoint_extra_bytes = 2.36
    config_class = QwenImageConfig
    vaes = ("qwen_image", "identity")
    supports_context_parallel = True
    folder_classes = ("QwenImageTransformer2DModel", "AutoencoderKLQwenImage")
    sigma_grid = "inverse_steps"  # QwenImagePipeline passes linspace(1, 1/N, N)

    @classmethod
    def task(cls, model) -> str:
        return "text-to-image"

    @staticmethod
    def image_tokens(latent_shape) -> int:
        _, _, h, w = latent_shape
        return (h // PATCH) * (w // PATCH)

    @classmethod
    def shift_tokens(cls, model) -> int:
        return cls.image_tokens(model.latent_shape)

    def install_context_parallel(self, module: nn.Module, runtime) -> nn.Module:
        """diffusers' own plan for this transformer (image and text tokens split at the first
        block, the RoPE tables and the text mask with them) and its Ulysses attention."""
        return context_parallel.install(module, runtime)

    def gather_tokens(self, module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return context_parallel.gather_tokens(module, tokens)

    def forward(self, module: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                **cond) -> torch.Tensor:
        dtype = module.img_in.weight.dtype
        height, width = x_t.shape[-2:]
        mask = text.ne(0).any(dim=-1)  # the pipeline's prompt mask: the tokens before the zero padding
        out = module(
            hidden_states=pack(x_t).to(dtype),
            encoder_hidden_states=text.to(dtype),
            encoder_hidden_states_mask=mask,
            timestep=(timestep / 1000).to(dtype),  # the pipeline's t / 1000: sigma
            img_shapes=[[(1, height // PATCH, width // PATCH)]] * x_t.shape[0],
            return_dict=False,
        )[0]
        return unpack(out, height, width)

    def block_tokens(self, output) -> torch.Tensor:
        """A double-stream block returns (text, image) states: the image stream's tokens."""
        return output[1]

    def blocks(self, module: nn.Module) -> list:
        return list(module.transformer_blocks)

    # --- memory plan -----------------------------------------------------
    def tokens_per_sample(self, module: nn.Module) -> int:
        return self.image_tokens(self.cfg.latent_shape) + self.cfg.text_len

    # --- LoRA ------------------------------------------------------------
    def lora_targets(self) -> List[str]:
        return list(QWEN_LORA_TARGETS)

    # --- checks ----------------------------------------------------------
    @classmethod
    def check(cls, config) -> List[str]:
        model = config.model
        if len(model.latent_shape) != 4 or model.latent_shape[1] != 1:
            return [f"model.latent_shape={list(model.latent_shape)}: model.family=qwen_image takes images, "
                    "[C, 1, H, W]"]
        errors = []
        if model.latent_shape[2] % PATCH or model.latent_shape[3] % PATCH:
            errors.append(f"model.latent_shape={list(model.latent_shape)}: H and W must be even "
                          "(the pipeline packs 2x2 latent pixels into one token)")
        if model.chunk_frames is not None:
            errors.append(f"model.chunk_frames={model.chunk_frames}: model.family=qwen_image has no block-causal "
                          "variant (images have one frame)")
        errors += [f"roles.{name}.causal=true: model.family=qwen_image has no block-causal variant"
                   for name, role in config.roles.items() if role.causal]
        errors += dynamic_shift_errors(model)
        for name in config.roles:
            arch, source, error = cls.role_architecture(config, name)
            errors += [error] if error else cls.check_arch(arch, model, source)
        return list(dict.fromkeys(errors))

    @classmethod
    def check_arch(cls, arch: dict, model, key: str) -> List[str]:
        errors = []
        if arch.get("joint_attention_dim", model.text_dim) != model.text_dim:
            errors.append(f"model.text_dim={model.text_dim} does not match joint_attention_dim="
                          f"{arch['joint_attention_dim']} of {key}")
        channels = PATCH * PATCH * model.latent_shape[0]
        if arch.get("in_channels", channels) != channels:
            errors.append(f"in_channels={arch['in_channels']} of {key} does not fit model.latent_shape[0]="
                          f"{model.latent_shape[0]}: packed 2x2 tokens have {channels} channels")
        head_dim, rope = arch.get("attention_head_dim"), arch.get("axes_dims_rope")
        if head_dim and rope and sum(rope) != head_dim:
            errors.append(f"axes_dims_rope={list(rope)} of {key} must sum to attention_head_dim={head_dim}")
        return errors

    # --- encoders, decoding, export --------------------------------------
    def encoders(self, folder: Path, text_only: bool, max_text_len: int, device: torch.device, image: bool = False):
        return QwenImageEncoders(Path(folder), text_only, max_text_len, device)

    def text_encoder(self, device: torch.device) -> "QwenImageEncoders":
        return QwenImageEncoders(self.part_folder("text_encoder"), text_only=True, max_text_len=self.cfg.text_len,
                                 device=device)

    def stock_pipeline(self) -> Optional[StockPipeline]:
        """QwenImagePipeline; it passes its own sigmas, linspace(1, 1/N, N), to the scheduler."""
        if self.cfg.vae != "qwen_image" or self.cfg.text_encoder != "family":
            return None
        return StockPipeline(class_name="QwenImagePipeline", transformers=(self.cfg.subfolder,),
                             parts=("tokenizer", "text_encoder", "vae"), output="image = pipe({call}).images[0]")


class QwenImageEncoders:
    """Qwen2.5-VL (with its tokenizer) and the Qwen-Image VAE from a diffusers Qwen-Image
    folder. Prompts go through QwenImagePipeline's own `encode_prompt` (its system template,
    the template's tokens dropped, padding removed), so the embeddings are the pipeline's."""

    image_encoder = None  # text-to-image: no image conditioning

    def __init__(self, model: Path, text_only: bool, max_text_len: int, device: torch.device):
        from diffusers import QwenImagePipeline
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.device = device
        self.max_text_len = max_text_len
        tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
        encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(model / "text_encoder").to(device).eval()
        self.vae = None
        if not text_only:
            from diffusers import AutoencoderKLQwenImage

            self.vae = AutoencoderKLQwenImage.from_pretrained(model, subfolder="vae").to(device).eval()
        self.pipeline = QwenImagePipeline(scheduler=None, vae=self.vae, text_encoder=encoder, tokenizer=tokenizer,
                                          transformer=None)

    @torch.no_grad()
    def text(self, captions: List[str]) -> List[torch.Tensor]:
        """Each caption's embedding with padding removed, [L, D]."""
        embeds, mask = self.pipeline.encode_prompt(captions, device=self.device, max_sequence_length=self.max_text_len)
        if mask is None:
            return [e.float().cpu() for e in embeds]
        return [e[: int(n)].float().cpu() for e, n in zip(embeds, mask.sum(dim=1).tolist())]

    @torch.no_grad()
    def video(self, clips: torch.Tensor) -> torch.Tensor:
        """Images as one-frame clips [N, 3, 1, H, W] in [-1, 1] -> the VAE posterior mean, un-normalised."""
        return self.vae.encode(clips.to(self.device)).latent_dist.mean.float().cpu()
