"""Wan2.1 through diffusers' WanTransformer3DModel."""

from typing import Optional

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from distill.config.validate import resolve_model_folder
from distill.models.flow_matching import FlowMatchingAdapter


class WanAdapter(FlowMatchingAdapter):
    def forward(self, module: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        dtype = next(module.parameters()).dtype
        return module(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text.to(dtype),
            return_dict=False,
        )[0]

    def load_transformer(self, path: Optional[str], seed: int) -> nn.Module:
        if path is None:
            # Every role built from the same seed starts from the same weights,
            # as DMD2's student and critic start from the teacher.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return WanTransformer3DModel(**self._arch())
        folder = resolve_model_folder(path, self.cfg.subfolder)
        if folder is None:
            raise FileNotFoundError(f"no diffusers model at {path} (subfolder {self.cfg.subfolder})")
        return WanTransformer3DModel.from_pretrained(folder, subfolder=self.cfg.subfolder, torch_dtype=torch.float32)

    def empty_transformer(self, path: Optional[str]) -> nn.Module:
        if path is None:
            return WanTransformer3DModel(**self._arch())
        folder = resolve_model_folder(path, self.cfg.subfolder)
        return WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder, subfolder=self.cfg.subfolder))

    def blocks(self, module: nn.Module) -> list:
        return list(module.blocks)

    @torch.no_grad()
    def decode_with_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents through AutoencoderKLWan from <model.path>/vae."""
        if getattr(self, "_vae", None) is None:
            from diffusers import AutoencoderKLWan

            if self.cfg.path is None:
                raise ValueError("model.vae=wan needs model.path with a vae/ folder (or model.vae=identity)")
            folder = resolve_model_folder(self.cfg.path, "vae")
            self._vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae").to(latents.device).eval()
        return self._vae.decode(latents.to(self._vae.dtype)).sample.float().clamp(-1, 1)

    def _arch(self) -> dict:
        arch = dict(self.cfg.arch)
        if "patch_size" in arch:
            arch["patch_size"] = tuple(arch["patch_size"])
        return arch
