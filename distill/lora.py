"""LoRA as a role converter (peft, through diffusers' adapter API).

Applied after loading and before activation checkpointing and sharding, on
every rank alike (on rank 0's full copy and on the meta-device skeletons),
so the adapters are sharded with the block that holds them.
"""

from typing import Dict, List

import torch
from torch import nn

ADAPTER = "default"


def apply_lora(module: nn.Module, lora, targets: List[str]) -> nn.Module:
    """Add adapters of `lora.rank` to `targets`; only the adapters train."""
    from peft import LoraConfig

    module.add_adapter(
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            lora_dropout=lora.dropout,
            target_modules=list(targets),
            init_lora_weights=True,  # B = 0: the converted network starts equal to the base
        ),
        adapter_name=ADAPTER,
    )
    for name, p in module.named_parameters():
        p.requires_grad_(is_adapter_weight(name))
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights, also over a bf16 base
    return module


def is_adapter_weight(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_lora(module: nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None))


def adapter_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights under diffusers' LoRA names (`blocks.0.attn1.to_q.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def adapter_metadata(module: nn.Module) -> dict:
    """The peft config diffusers stores beside LoRA weights, so that loading needs no guessing."""
    meta = module.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (W + alpha/r * B A) and drop them."""
    module.fuse_lora()
    module.unload_lora()
    return module
