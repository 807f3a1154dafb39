"""What every family served by one diffusers transformer class shares: building it
from `model.arch` or reading it from a folder at a role's precision, its
architecture read without weights (for checks and plans), saving, and the
activation model of its memory plan from constants measured per family
(benchmarks/family_activations.py)."""

from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn

from distill.models.flow_matching import FlowMatchingAdapter
from distill.models.folders import read_component_config, resolve_model_folder


def cast_keeping_fp32(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating-point weights to `dtype` except the modules diffusers keeps in
    fp32 (`_keep_in_fp32_modules`), as `from_pretrained(torch_dtype=...)` does."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    for name, sub in module.named_modules():
        for tensors in (sub._parameters, sub._buffers):
            for key, t in tensors.items():
                full = f"{name}.{key}" if name else key
                if t is None or not t.is_floating_point() or keep & set(full.split(".")):
                    continue  # matched on the tensor's full name, as diffusers does
                t.data = t.data.to(dtype)
    return module


class DiffusersNetworkAdapter(FlowMatchingAdapter):
    """A family whose role networks are one diffusers class (`model_class_name`)."""

    model_class_name: ClassVar[str]
    lora_pipeline_name: ClassVar[str]  # the pipeline whose save_lora_weights writes the family's LoRA format
    vae_class_name: ClassVar[str] = ""  # the VAE class in <model.path>/vae that decodes samples
    # the transformer/config.json of public checkpoints by repo id, so that a memory plan
    # (plan=true) can be made where the weights are not
    public_architectures: ClassVar[Dict[str, dict]] = {}
    tuple_keys: ClassVar[Tuple[str, ...]] = ()  # config keys the class wants as tuples
    default_depth: ClassVar[int] = 0  # num_layers when a config.json leaves it out
    # the activation model: one block's forward + backward peak in bytes per token and unit of
    # width, by element bytes; of that peak, what stays for the backward and what a forward
    # without gradient adds; and what a checkpointed block keeps beyond its input
    block_bytes: ClassVar[Dict[int, float]] = {}
    stored_fraction: ClassVar[float] = 0.0
    no_grad_fraction: ClassVar[float] = 0.0
    checkpoint_extra_bytes: ClassVar[float] = 0.0

    @property
    def model_class(self):
        # imported here, where a network is built: launch.py validates and submits without diffusers
        import diffusers

        return getattr(diffusers, self.model_class_name)

    def load(self, path: Optional[str], seed: int, dtype: torch.dtype = torch.float32,
             subfolder: Optional[str] = None) -> nn.Module:
        subfolder = subfolder or self.cfg.subfolder
        if path is None:
            # Every role built from the same seed starts from the same weights,
            # as DMD2's student and critic start from the teacher.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return cast_keeping_fp32(self.model_class(**self._arch()), dtype)
        folder = resolve_model_folder(path, subfolder)
        if folder is None:
            raise FileNotFoundError(f"no diffusers model at {path} (subfolder {subfolder})")
        return self.model_class.from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype)

    def empty(self, path: Optional[str], dtype: torch.dtype = torch.float32,
              subfolder: Optional[str] = None) -> nn.Module:
        subfolder = subfolder or self.cfg.subfolder
        if path is None:
            module = self.model_class(**self._arch())
        elif resolve_model_folder(path, subfolder) is None and path in self.public_architectures:
            module = self.model_class(**self._arch(self.public_architectures[path]))  # planning only
        else:
            folder = resolve_model_folder(path, subfolder)
            module = self.model_class.from_config(self.model_class.load_config(folder, subfolder=subfolder))
        return cast_keeping_fp32(module, dtype)

    def _arch(self, arch: Optional[dict] = None) -> dict:
        return self.arch_kwargs(self.cfg.arch if arch is None else arch)

    @classmethod
    def arch_kwargs(cls, arch: dict) -> dict:
        """A config (from YAML or JSON: lists) as the class's constructor takes it."""
        arch = dict(arch)
        for key in cls.tuple_keys:
            if key in arch:
                arch[key] = tuple(arch[key])
        return arch

    def save(self, module: nn.Module, folder: Path) -> None:
        module.save_pretrained(Path(folder) / self.cfg.subfolder)

    def save_lora(self, module: nn.Module, folder: Path) -> None:
        """The adapters in the family's diffusers LoRA format (`<Pipeline>.load_lora_weights(folder)`)."""
        import diffusers

        from distill.lora import adapter_metadata, adapter_state

        getattr(diffusers, self.lora_pipeline_name).save_lora_weights(
            folder, transformer_lora_layers=adapter_state(module),
            transformer_lora_adapter_metadata=adapter_metadata(module))

    def load_lora(self, module: nn.Module, folder: Path) -> nn.Module:
        module.load_lora_adapter(str(folder), prefix="transformer", adapter_name="default",
                                 weight_name="pytorch_lora_weights.safetensors")
        return module

    def part_folder(self, part: str) -> Path:
        """The model folder holding `<part>/` (text_encoder, vae, ...), or ValueError naming model.path."""
        folder = resolve_model_folder(self.cfg.path, part) if self.cfg.path else None
        if folder is None:
            raise ValueError(f"model.path={self.cfg.path}: no {part}/ folder there (point model.path at a "
                             f"diffusers {self.family} folder, or set model.vae=identity / model.text_encoder=hash)")
        return Path(folder)

    def decode_with_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents through the family's VAE from <model.path>/vae, in [-1, 1]."""
        if getattr(self, "_vae", None) is None:
            import diffusers

            vae_class = getattr(diffusers, self.vae_class_name)
            self._vae = vae_class.from_pretrained(self.part_folder("vae"), subfolder="vae").to(latents.device).eval()
        return self._vae.decode(latents.to(self._vae.dtype)).sample.float().clamp(-1, 1)

    def hidden_size(self, module: nn.Module) -> int:
        return module.config.num_attention_heads * module.config.attention_head_dim

    @classmethod
    def role_architecture(cls, config, name: str) -> Tuple[Optional[dict], str, Optional[str]]:
        """The transformer config.json of roles.<name>'s network (its path, else model.path,
        else model.arch), read without loading weights: (arch, the key it comes from, error)."""
        model, role = config.model, config.roles[name]
        key = f"roles.{name}.path" if role.path else "model.path"
        path = role.path or model.path
        if path is None:
            if not model.arch:
                return None, key, f"{key} is null and model.arch is empty: give a model folder or an architecture"
            return dict(model.arch), "model.arch", None
        if config.plan and path in cls.public_architectures and resolve_model_folder(path, model.subfolder) is None:
            return dict(cls.public_architectures[path]), key, None  # a plan needs the shapes, not the weights
        arch, error = read_component_config(path, model.subfolder, key)
        return arch, key, error

    @classmethod
    def depth(cls, arch: dict) -> int:
        return arch.get("num_layers", cls.default_depth)

    @classmethod
    def layer_names(cls, arch: dict) -> List[str]:
        """The network's linear layers (what LoRA can adapt), from a meta-device build of
        `arch`: no weights are read or allocated."""
        import diffusers
        from accelerate import init_empty_weights

        with init_empty_weights():
            network = getattr(diffusers, cls.model_class_name).from_config(cls.arch_kwargs(arch))
        return [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]

    def activation_bytes(self, module: nn.Module, tokens: int, samples: int, element_bytes: int,
                         checkpointing: bool, grad: bool) -> Tuple[float, float]:
        """(kept, transient) activation bytes of one forward over `samples` samples of
        `tokens` tokens each (per rank): kept until the backward (with `grad`), and
        the most one block adds at a time (its forward, or its recompute and backward)."""
        c = module.config
        width = tokens * samples * self.hidden_size(module)
        block = width * self.block_bytes[element_bytes]
        if not grad:
            return 0.0, self.no_grad_fraction * block
        if checkpointing:  # each block keeps its input, one element per token and unit of width
            return c.num_layers * width * (element_bytes + self.checkpoint_extra_bytes), block
        return c.num_layers * self.stored_fraction * block, (1 - self.stored_fraction) * block
