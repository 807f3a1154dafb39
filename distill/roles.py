"""Roles: each named network of a run with its trainability, precision,
optimizer, LR schedule and EMA. The method decides what a role is for.

Every role is built by one pipeline, the same on 1 and N ranks:

    load (at the role's precision) -> convert (LoRA) -> activation checkpointing
      -> context parallelism (parallel.context > 1) -> shard (FSDP2, N ranks)
      -> optimizer and LR schedule (trainable roles)
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from distill import activation_checkpointing
from distill.config.schema import EmaUpdate, Precision, RoleConfig
from distill.distributed import Runtime
from distill.ema import EMA
from distill.lora import apply_lora
from distill.parallel import DTYPES, materialise, shard


@dataclass
class Role:
    name: str
    cfg: RoleConfig
    module: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    ema: Optional[EMA] = None
    # the network carries another role's LoRA adapters (lora.base_role); this role runs without them
    adapters_off: bool = False

    @property
    def trainable(self) -> bool:
        return self.cfg.trainable

    @property
    def sharded(self) -> bool:
        return isinstance(self.module, FSDPModule)

    def trained_names(self) -> List[str]:
        """The parameters this role's optimizer updates (all of them, or the LoRA adapters)."""
        return [n for n, p in self.module.named_parameters() if p.requires_grad]

    def trained_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @contextmanager
    def compute(self):
        """How this role's forward runs: bf16 autocast for an unsharded trainable role
        (FSDP2's policy casts otherwise), without the adapters of a role sharing its network."""
        if self.trainable and self.cfg.precision == Precision.bf16 and not self.sharded:
            device_type = next(self.module.parameters()).device.type
            cast = torch.autocast(device_type, dtype=torch.bfloat16)
        else:
            cast = nullcontext()
        if self.adapters_off:
            self.module.disable_adapters()
        try:
            with cast:
                yield
        finally:
            if self.adapters_off:
                self.module.enable_adapters()

    def sync_gradients(self, flag: bool) -> None:
        """With FSDP2, skip the gradient reduce-scatter on all but the last micro-batch."""
        if self.sharded and self.trainable:
            self.module.set_requires_gradient_sync(flag)

    def clip_and_step(self, step: int) -> torch.Tensor:
        """Clip the gradient, step optimizer, schedule and EMA; returns the pre-clip
        norm, a device tensor (read at log steps only)."""
        limit = float("inf") if self.cfg.max_grad_norm is None else self.cfg.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters(), limit)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and self.cfg.ema_update == EmaUpdate.step:
            self.ema.update(self.module, step)
        return norm.detach()

    def end_iteration(self, iteration: int) -> None:
        """After training iteration `iteration` (0-based), stepped or not."""
        if self.ema is not None and self.cfg.ema_update == EmaUpdate.iteration:
            self.ema.update(self.module, iteration + 1)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # --- a checkpoint part (trainable roles): the frozen base of a LoRA role is not saved
    def state_dict(self) -> dict:
        trained = set(self.trained_names())
        state = {
            "model": {k: v for k, v in get_model_state_dict(self.module).items() if k in trained},
            "optim": get_optimizer_state_dict(self.module, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.module, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def storage_dtype(cfg: RoleConfig) -> torch.dtype:
    """Trained weights are fp32 masters (bf16 is their compute precision); frozen
    weights, a frozen role's or a LoRA role's base, are stored at the precision
    they compute in. LoRA adapters are fp32 whatever their base (`apply_lora`)."""
    return torch.float32 if cfg.trainable and cfg.lora.rank == 0 else DTYPES[cfg.precision]


def convert(module: nn.Module, cfg: RoleConfig, adapter, seed: int) -> nn.Module:
    """The converters a role asks for (LoRA now; quantisation would go here).

    New weights are drawn from `seed` alone, so every process (and any number
    of ranks) converts alike, and the global RNG is left as it was."""
    if cfg.trainable and cfg.lora.rank > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = apply_lora(module, cfg.lora, cfg.lora.target_modules or adapter.lora_targets())
    if cfg.trainable:  # parts the model trains frozen (one expert of a pair)
        module = adapter.freeze_untrained(module)
    return module


def attach(module: nn.Module, extras: Optional[Callable[[nn.Module], Dict[str, nn.Module]]], cfg: RoleConfig,
           seed: int) -> List[str]:
    """Add the method's extra modules for this role (fp32, seeded alike on every
    rank, trained with the role); returns their names."""
    if extras is None:
        return []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        added = extras(module)
    for name, extra in added.items():
        module.add_module(name, extra.float().requires_grad_(cfg.trainable))
    return list(added)


def prepare(module: nn.Module, cfg: RoleConfig, adapter, seed: int, compiled: bool = False) -> nn.Module:
    """convert -> trainability -> activation checkpointing -> causal variant ->
    attention backend -> compiled blocks: everything before the method's extra
    modules and sharding."""
    module = convert(module, cfg, adapter, seed)
    # frozen: no grads, no optimizer; its checkpointing matters when a loss back-propagates
    # through it to its input (a GAN term on the teacher's features)
    module = module.train() if cfg.trainable else module.requires_grad_(False).eval()
    activation_checkpointing.enable(module, cfg.activation_checkpointing)
    module = adapter.make_causal(module) if cfg.causal else module
    adapter.set_attention_backend(module)
    if compiled:
        compile_blocks(adapter.blocks(module))
    return module


def compile_blocks(blocks) -> None:
    """Regional compilation: each block's forward compiled in place. The blocks share
    their code, and with nn.Module inlining (torch's default) parameters are graph
    inputs, so every block of every role with that architecture reuses one compiled
    graph per dtype and grad mode, instead of compiling the whole network."""
    for block in blocks:
        block.compile(dynamic=False)


def compile_enabled(runtime: Runtime, flag: Optional[bool]) -> bool:
    """training.compile, or (null) on when the run's device is a GPU."""
    return flag if flag is not None else runtime.device.type == "cuda"


def build_module(cfg: RoleConfig, path: Optional[str], seed: int, adapter, runtime: Runtime,
                 extras: Optional[Callable[[nn.Module], Dict[str, nn.Module]]] = None,
                 compile_blocks_flag: Optional[bool] = False) -> nn.Module:
    """load -> prepare -> shard: one pipeline for 1 and N ranks.

    With N ranks, every rank prepares the architecture on the meta device and
    shards it (each block, each extra module, the root); only rank 0 loads (and
    prepares alike) the full weights, which are broadcast shard-wise.
    """
    dtype = storage_dtype(cfg)
    compiled = compile_enabled(runtime, compile_blocks_flag)

    def load() -> nn.Module:
        module = prepare(adapter.load(path, seed, dtype), cfg, adapter, seed, compiled)
        attach(module, extras, cfg, seed)
        return module

    if not runtime.distributed:
        return load().to(runtime.device)
    from accelerate import init_empty_weights

    full = load().state_dict() if runtime.is_main else {}
    with init_empty_weights(include_buffers=False):
        module = prepare(adapter.empty(path, dtype), cfg, adapter, seed, compiled)
        added = attach(module, extras, cfg, seed)
    if runtime.context > 1:
        module = adapter.install_context_parallel(module, runtime)
    shard(module, adapter.blocks(module), cfg, runtime, extras=[module.get_submodule(name) for name in added])
    return materialise(module, full, runtime, offloaded=cfg.cpu_offload)


def weights_path(config, name: str) -> Optional[str]:
    """Where a role's (base) weights come from: its own path, the model's, or
    those of the role whose network it shares (lora.base_role)."""
    cfg = config.roles[name]
    if cfg.lora.base_role:
        return weights_path(config, cfg.lora.base_role)
    return cfg.path or config.model.path


def build_roles(config, adapter, runtime: Runtime) -> Dict[str, Role]:
    """Every role of the config, loaded, converted and sharded (no optimizer yet).

    A LoRA role with lora.base_role is built together with that frozen role:
    one network, converted and sharded once, that both roles run."""
    from distill.registry import method_class

    method = method_class(config.method.name)

    def extras(role: str):
        return lambda network: method.role_modules(config.method, adapter, role, network)

    sharing = {cfg.lora.base_role: name for name, cfg in config.roles.items() if cfg.lora.base_role}
    roles = {}
    for name, cfg in config.roles.items():
        if cfg.lora.base_role:
            continue  # built with its base role
        if name in sharing:
            lora_name = sharing[name]
            module = build_module(config.roles[lora_name], weights_path(config, name), config.seed, adapter, runtime,
                                  extras(lora_name), config.training.compile)
            roles[name] = Role(name, cfg, module, adapters_off=True)
            roles[lora_name] = Role(lora_name, config.roles[lora_name], module)
        else:
            module = build_module(cfg, weights_path(config, name), config.seed, adapter, runtime, extras(name),
                                  config.training.compile)
            roles[name] = Role(name, cfg, module)
    return {name: roles[name] for name in config.roles}


def fused_adamw(params: List[nn.Parameter]) -> Optional[bool]:
    """AdamW's fused kernel on CUDA (one launch for all parameters); None elsewhere
    (torch's default, foreach on the CPU)."""
    return True if params and all(p.device.type == "cuda" for p in params) else None


def init_state(optimizer: torch.optim.AdamW) -> None:
    """AdamW's state for every parameter now, as its first step would make it (step 0,
    zero moments): a parameter that no step has reached yet (an expert no sample was
    routed to) is then in every checkpoint, so a resumed run finds what it restores.
    AdamW skips parameters without a gradient, so the numbers are those of a lazy start.
    The fused kernel keeps its step counter on the parameter's device, as AdamW would."""
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        for p in group["params"]:
            step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def attach_optimizers(roles: Dict[str, Role], updates: Dict[str, int], lrs: Optional[Dict[str, float]] = None) -> None:
    """The pipeline's last stage, once the method can say how often each role steps:
    AdamW over each trainable role's trained parameters at the method's learning
    rate for it (`lrs`, else roles.<r>.optimizer.lr), an LR schedule spanning
    `updates[name]` optimizer steps unless the role sets total_steps, and the EMA."""
    lrs = lrs or {}
    for name, role in roles.items():
        if not role.trainable:
            continue
        opt, sched = role.cfg.optimizer, role.cfg.scheduler
        params = role.trained_parameters()
        role.optimizer = torch.optim.AdamW(
            params, lr=lrs.get(name, opt.lr), betas=tuple(opt.betas), weight_decay=opt.weight_decay, eps=opt.eps,
            fused=fused_adamw(params),
        )
        init_state(role.optimizer)
        from diffusers.optimization import get_scheduler

        role.scheduler = get_scheduler(
            sched.name.value, role.optimizer, num_warmup_steps=sched.warmup_steps,
            num_training_steps=sched.total_steps or max(updates[name], 1),
        )
        if role.cfg.ema_decay is not None:
            role.ema = EMA(role.module, role.cfg.ema_decay, role.cfg.ema_start_step)
