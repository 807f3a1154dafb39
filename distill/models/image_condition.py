"""Image-to-video by first-frame latent conditioning (model.image_condition=first_frame).

Wan2.2-TI2V-5B's way, as diffusers' Wan pipelines do it with `expand_timesteps`:
  - the network sees the clean image latent in place of the first latent frame,
    whatever the noise level of the others;
  - the first frame's tokens run at timestep 0, the others at the sample's;
  - the pipeline writes the image latent over the first frame after every step.

The last point is kept here by the velocity: the first frame's velocity is the
one that takes x_t's first frame onto the image latent (x0 = x_t - sigma * v),
so every x0 prediction is the image there. Rollouts, the DMD score difference
and the critic's flow-matching target then all hold the first frame fixed at
the condition, and no loss or gradient reaches it.
"""

import torch

KEY = "first_frame"  # the batch key and forward keyword: [B, C, 1, H, W], model space


def hold_first_frame(x_t: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    """x_t [B, C, T, H, W] with its first latent frame replaced by the clean image latent."""
    return torch.cat([first_frame.to(x_t.dtype), x_t[:, :, 1:]], dim=2)


def first_frame_timesteps(timestep: torch.Tensor, frames: int) -> torch.Tensor:
    """[B] (or [B, frames]) timesteps -> [B, frames] with the first frame's at 0."""
    per_frame = timestep[:, None].expand(-1, frames) if timestep.dim() == 1 else timestep
    return torch.cat([torch.zeros_like(per_frame[:, :1]), per_frame[:, 1:]], dim=1)


def first_frame_velocity(v: torch.Tensor, x_t: torch.Tensor, first_frame: torch.Tensor,
                         sigma: torch.Tensor) -> torch.Tensor:
    """v with the first frame's velocity set to (x_t - image) / sigma, the one whose
    x0 is the image latent (0 where sigma is 0: x_t is clean there already)."""
    s = (sigma[:, 0] if sigma.dim() == 2 else sigma).to(v.dtype).reshape(-1, 1, 1, 1, 1)
    held = torch.where(s > 0, (x_t[:, :, :1].to(v.dtype) - first_frame.to(v.dtype)) / s.clamp_min(1e-12),
                       torch.zeros_like(v[:, :, :1]))
    return torch.cat([held, v[:, :, 1:]], dim=2)


# --- concat (Wan2.1-I2V-14B, as diffusers' WanImageToVideoPipeline) -------------
IMAGE_LATENT = "image_latent"  # [B, C, T, H, W]: the image then black frames through the VAE, model space
IMAGE_EMBEDS = "image_embeds"  # [B, tokens, D]: the image encoder's penultimate hidden states
MASK_CHANNELS = 4  # the first-frame mask, one channel per pixel frame of a latent frame (Wan's 4x in time)


def concat_inputs(x_t: torch.Tensor, image_latent: torch.Tensor) -> torch.Tensor:
    """[x_t, mask, image latent] on channels: the mask is 1 over the first latent frame
    (the image's four pixel frames) and 0 after, as the pipeline builds it."""
    b, _, t, h, w = x_t.shape
    mask = torch.zeros(b, MASK_CHANNELS, t, h, w, dtype=x_t.dtype, device=x_t.device)
    mask[:, :, 0] = 1
    return torch.cat([x_t, mask, image_latent.to(x_t.dtype)], dim=1)


def image_of(cond: dict):
    """The conditioning image's latent [B, C, 1, H, W] among a forward's inputs, or None."""
    if KEY in cond:
        return cond[KEY]
    if IMAGE_LATENT in cond:
        return cond[IMAGE_LATENT][:, :, :1]
    return None
