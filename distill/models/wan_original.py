"""Wan's original key layout (the Wan repository's, which ComfyUI and most tools read)
for a network in diffusers' layout: single-file checkpoints and LoRA files.

diffusers' own single-file loader renames original keys to its own with a table of
substring replacements (`convert_wan_transformer_to_diffusers`); this is the
inverse, module path by module path. A single file in this layout loads in ComfyUI's
diffusion-model loader (it recognises Wan by `head.modulation`) and back into
diffusers with `WanTransformer3DModel.from_single_file(path, config=...)`.

LoRA files follow the convention of ComfyUI's Wan loader and of the published Wan
LoRAs (Kijai's, lightx2v's): `diffusion_model.<original module>.lora_down.weight`
(diffusers' lora_A), `.lora_up.weight` (lora_B) and a scalar `.alpha`, which
`WanPipeline.load_lora_weights` also converts, applying alpha / rank.
"""

import re
from typing import Dict

import torch

# diffusers module path -> original, for the parts outside the blocks
TOP_LEVEL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
# inside blocks.N: diffusers -> original
IN_BLOCK = {
    "attn1": "self_attn",
    "attn2": "cross_attn",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "o",
    "add_k_proj": "k_img",
    "add_v_proj": "v_img",
    "norm_added_k": "norm_k_img",
    "norm_q": "norm_q",
    "norm_k": "norm_k",
    "norm2": "norm3",  # the cross-attention norm: diffusers' norm2 is the original norm3
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def original_module(path: str) -> str:
    """The original name of a diffusers module path (no parameter suffix)."""
    match = BLOCK.match(path)
    if match is None:
        if path not in TOP_LEVEL:
            raise KeyError(f"{path}: no original Wan name for this module")
        return TOP_LEVEL[path]
    index, rest = match.groups()
    parts = []
    while rest:
        for name in sorted(IN_BLOCK, key=len, reverse=True):  # longest first: "ffn.net.0.proj" before "to_q"
            if rest == name or rest.startswith(name + "."):
                parts.append(IN_BLOCK[name])
                rest = rest[len(name) + 1:]
                break
        else:
            raise KeyError(f"blocks.{index}.{rest}: no original Wan name for this module")
    return ".".join([f"blocks.{index}", *parts])


def original_key(key: str) -> str:
    """`blocks.0.attn1.to_q.weight` -> `blocks.0.self_attn.q.weight`."""
    if key == "scale_shift_table" or key.endswith(".scale_shift_table"):  # a parameter, not a module
        return original_module(key)
    module, _, param = key.rpartition(".")
    return f"{original_module(module)}.{param}"


def to_original(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A diffusers WanTransformer3DModel state dict in the original layout."""
    return {original_key(k): v for k, v in state.items()}


def comfy_lora(adapters: Dict[str, torch.Tensor], alpha: float) -> Dict[str, torch.Tensor]:
    """diffusers-named adapters (`blocks.0.attn1.to_q.lora_A.weight`) as a ComfyUI /
    original-key LoRA file, with each module's alpha stored beside it."""
    out = {}
    for key, value in adapters.items():
        module, kind = re.match(r"^(?:transformer\.)?(.+)\.(lora_A|lora_B)\.weight$", key).groups()
        name = f"diffusion_model.{original_module(module)}"
        out[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out
