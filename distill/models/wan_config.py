"""Wan's own model keys (model.* when model.family=wan): two experts, image
conditioning, umT5's text shape and the Wan VAE. The keys every family has are
in distill/config/schema.py's ModelConfig."""

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from distill.config.schema import ModelConfig


class ImageCondition(str, Enum):
    none = "none"  # text-to-video
    # image-to-video as Wan2.2-TI2V-5B does it (diffusers' `expand_timesteps`): the
    # first latent frame is the clean image latent, its tokens at timestep 0
    first_frame = "first_frame"
    # image-to-video as Wan2.1-I2V-14B does it: the latent of the image followed by
    # black frames and a first-frame mask concatenated to the input on channels,
    # and the image's CLIP embeddings through the transformer's image projection
    concat = "concat"


@dataclass
class WanConfig(ModelConfig):
    family: str = "wan"
    shift: float = 3.0
    latent_shape: List[int] = field(default_factory=lambda: [16, 21, 60, 104])  # 81 frames at 480x832
    text_len: int = 512  # umT5's padded length
    text_dim: int = 4096  # umT5-XXL's width
    vae: str = "wan"  # wan: AutoencoderKLWan from <model.path>/vae; identity: the latents are the pixels
    text_encoder: str = "family"  # umT5 from <model.path>/text_encoder
    # two experts by noise level (Wan2.2 A14B): <path>/transformer serves timesteps
    # t >= boundary_ratio * 1000, <path>/transformer_2 those below (diffusers'
    # boundary_ratio); every role is such a pair. null: one network
    boundary_ratio: Optional[float] = None
    trained_experts: List[str] = field(default_factory=lambda: ["high", "low"])  # of a trainable role; the other stays frozen, unsaved
    # classifier-free guidance of the low-noise expert (the pipeline's guidance_scale_2);
    # null: the method's guidance_scale, which the high-noise expert uses
    low_noise_guidance_scale: Optional[float] = None
    # how a video is conditioned on an image (its first frame); the batch then
    # carries the image's latent (first_frame: `first_frame` [C, 1, H, W]; concat:
    # `image_latent` [C, T, H, W], in model space) and for concat its CLIP
    # embeddings (`image_embeds` [tokens, D])
    image_condition: ImageCondition = ImageCondition.none
