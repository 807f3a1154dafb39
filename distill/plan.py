"""The memory plan: bytes per GPU of each role before a job is queued.

    python launch.py experiment=... plan=true [launcher.gpu_memory_gib=80]

Every role's network is built on the meta device through the same pipeline
as training (load -> LoRA -> the method's extra modules), so parameter counts
and dtypes are exact; nothing is allocated and no weights are read. Per GPU:

    parameters   stored bytes / FSDP ranks (0 when offloaded to CPU), plus the
                 two blocks FSDP gathers at once (sharded) or autocast's bf16
                 weight copies (one rank, bf16 over fp32 masters)
    gradients    fp32, trained parameters / FSDP ranks, while the role steps
    optimizer    AdamW's two fp32 moments of the trained parameters / FSDP ranks
    EMA          one fp32 copy of the trained parameters / FSDP ranks
    activations  the model family's estimate from tokens per rank (tokens /
                 context), batch, layers, hidden and FFN width, precision and
                 activation checkpointing, for the forwards the method holds
                 at once (`Method.memory_phases`)

The peak is the largest phase. A plan fits when the peak is at most
USABLE_FRACTION of the GPU's memory (the CUDA context and the caching
allocator's fragmentation take the rest).
"""

import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from distill.config.schema import Checkpointing, Config, Precision
from distill import jvp
from distill.distributed import mesh_shape

GiB = 2**30
USABLE_FRACTION = 0.9
# fp32 latent-sized tensors a forward with gradient keeps beside its blocks' activations
# (input, noise, target, the output gathered whole on every rank of a context group):
# not split by context parallelism; fitted on the CPU tiny runs (benchmarks/context_parallel.py)
LATENT_COPIES = 4
# a forward-mode JVP (no gradient) holds each activation's tangent beside it
TANGENT_COPIES = 2
# with context parallelism, full-sequence [tokens, hidden] fp32 tensors a forward with
# gradient keeps on every rank of the group (the patch-embedded input the split takes
# a view of, and what the gather and its backward hold); fitted on the CPU runs of
# benchmarks/context_parallel.py at context 2 and 4
FULL_SEQUENCE_COPIES = 4
DEFAULT_GPU_GIB = 80.0


@dataclass
class Layout:
    world: int
    replicate: int
    context: int

    @property
    def fsdp(self) -> int:
        """Ranks a role's weights are split over (one rank: not sharded)."""
        return self.world // self.replicate if self.world > 1 else 1


@dataclass
class RoleMemory:
    name: str
    params: float = 0.0
    grads: float = 0.0  # while the role steps
    optimizer: float = 0.0
    ema: float = 0.0
    cpu: float = 0.0  # offloaded shards, in host memory
    activations: Dict[str, float] = field(default_factory=dict)  # phase -> bytes

    @property
    def resident(self) -> float:
        return self.params + self.optimizer + self.ema


@dataclass
class Plan:
    layout: Layout
    tokens: int  # per sample
    roles: Dict[str, RoleMemory]
    phases: Dict[str, float]  # phase -> total bytes per GPU
    gpu_gib: float

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak <= USABLE_FRACTION * self.gpu_gib * GiB


def networks(config: Config, adapter) -> Dict[str, nn.Module]:
    """Each role's network on the meta device, as build_roles would make it; a LoRA role
    sharing its base role's network gets that network (counted once, with its base)."""
    from distill.registry import method_class
    from distill.roles import attach, prepare, storage_dtype, weights_path

    method = method_class(config.method.name)
    sharing = {cfg.lora.base_role: name for name, cfg in config.roles.items() if cfg.lora.base_role}
    built = {}
    for name, cfg in config.roles.items():
        if cfg.lora.base_role:
            continue
        owner = sharing.get(name, name)  # whose config converts the network
        owner_cfg = config.roles[owner]
        with init_empty_weights(include_buffers=False):
            module = prepare(adapter.empty(weights_path(config, name), storage_dtype(owner_cfg)), owner_cfg, adapter,
                             config.seed)
            attach(module, lambda net: method.role_modules(config.method, adapter, owner, net), owner_cfg, config.seed)
        built[name] = module
        if owner != name:
            built[owner] = module
    return built


def _bytes(params) -> float:
    return float(sum(p.numel() * p.element_size() for p in params))


def compute_bytes(cfg) -> int:
    return 2 if cfg.precision == Precision.bf16 else 4


def role_memory(config: Config, adapter, name: str, module: nn.Module, layout: Layout, shared_base: bool) -> RoleMemory:
    cfg = config.roles[name]
    mem = RoleMemory(name)
    trained = [p for p in module.parameters() if p.requires_grad] if cfg.trainable else []
    frozen = [p for p in module.parameters() if not p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    # a LoRA role on its base's network owns the adapters; the base owns the frozen weights
    own = trained if cfg.lora.base_role else (frozen if shared_base else list(module.parameters()))
    stored = _bytes(own) / layout.fsdp
    if cfg.cpu_offload:
        mem.cpu, stored = stored, 0.0
    largest_block = max((sum(p.numel() for p in b.parameters()) for b in adapter.blocks(module)), default=0)
    working = 2 * largest_block * compute_bytes(cfg) if layout.world > 1 else 0.0  # gathered block, prefetched one
    mem.params = stored + (0.0 if shared_base and not cfg.trainable else working)
    if cfg.trainable:
        mem.grads = 4.0 * n_trained / layout.fsdp + (4.0 * largest_block if layout.world > 1 else 0.0)
        mem.optimizer = 8.0 * n_trained / layout.fsdp
        mem.ema = 4.0 * n_trained / layout.fsdp if cfg.ema_decay is not None else 0.0
    return mem


def make_plan(config: Config, adapter, layout: Layout, gpu_gib: float) -> Plan:
    from distill.registry import method_class

    built = networks(config, adapter)
    shared = {cfg.lora.base_role for cfg in config.roles.values() if cfg.lora.base_role}
    roles = {name: role_memory(config, adapter, name, built[name], layout, name in shared) for name in config.roles}
    tokens = adapter.tokens_per_sample(next(iter(built.values())))
    per_rank = tokens // layout.context
    phases = {}
    resident = sum(r.resident for r in roles.values())
    for phase in method_class(config.method.name).memory_phases(config.method):
        graphs, steps = [], []  # (role, kept, transient) of each forward with gradient; (graphs before, its peak)
        for fwd in phase.forwards:
            kept, peak = forward_bytes(config, adapter, built[fwd.role], fwd, per_rank, layout)
            roles[fwd.role].activations[phase.name] = roles[fwd.role].activations.get(phase.name, 0.0) + kept + peak
            steps.append((len(graphs), kept + peak if fwd.grad else peak))  # a forward without gradient keeps nothing
            if fwd.grad:
                graphs.append((fwd.role, kept, peak))
        forward_peak = max(sum(k for _, k, _ in graphs[:i]) + now for i, now in steps)
        phases[phase.name] = resident + max(forward_peak, backward_peak(graphs, roles, phase.stepping))
    return Plan(layout, tokens, roles, phases, gpu_gib)


def forward_bytes(config: Config, adapter, module: nn.Module, fwd, tokens: int, layout: Layout) -> Tuple[float, float]:
    """(kept, transient) of one forward; unsharded bf16 over fp32 masters without
    checkpointing also keeps autocast's bf16 weight copies for the backward."""
    cfg = config.roles[fwd.role]
    # selective checkpointing is planned as none: an upper bound (its savings are not modelled)
    checkpointing = cfg.activation_checkpointing == Checkpointing.full
    kept, peak = adapter.activation_bytes(module, tokens, fwd.samples * config.data.batch_size, compute_bytes(cfg),
                                          checkpointing, fwd.grad)
    if fwd.grad:
        kept += LATENT_COPIES * 4.0 * math.prod(adapter.latent_shape) * fwd.samples * config.data.batch_size
        if layout.context > 1:
            full = tokens * layout.context * adapter.hidden_size(module)
            kept += FULL_SEQUENCE_COPIES * 4.0 * full * fwd.samples * config.data.batch_size
    if fwd.tangent:
        peak = TANGENT_COPIES * peak + attention_tangent_bytes(module, tokens, fwd.samples * config.data.batch_size)
    if fwd.grad and layout.world == 1 and cfg.trainable and cfg.precision == Precision.bf16 and not checkpointing:
        kept += 2.0 * sum(p.numel() for p in module.parameters())
    return kept, peak


def attention_tangent_bytes(module: nn.Module, tokens: int, samples: int) -> float:
    """The float32 working set of attention's tangent (distill/jvp.py): a block of
    queries against every key, per head and sample, at most its workspace."""
    heads = getattr(getattr(module, "config", None), "num_attention_heads", 1)
    return float(jvp.workspace_bytes(samples * heads, tokens, tokens))


def backward_peak(graphs, roles: Dict[str, RoleMemory], stepping) -> float:
    """The backward runs the graphs newest first; while graph i runs, the gradients of
    the roles done so far and the kept activations of the graphs still to run are
    held, with graph i's own block transient."""
    peak, done = 0.0, set()
    for i in reversed(range(len(graphs))):
        role, _, transient = graphs[i]
        done.add(role)
        grads = sum(roles[r].grads for r in done if r in stepping)
        waiting = sum(kept for _, kept, _ in graphs[:i])
        peak = max(peak, grads + waiting + transient)
    return peak


def layout_of(config: Config) -> Layout:
    from distill.config.validate import world_size

    world = world_size(config.launcher)
    replicate, _, context = mesh_shape(config.parallel, world)
    return Layout(world, replicate, context)


def gpu_memory_gib(config: Config) -> float:
    if config.launcher.gpu_memory_gib:
        return float(config.launcher.gpu_memory_gib)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GiB
    return DEFAULT_GPU_GIB


def smallest_fit(config: Config, adapter, gpus_per_node: int, max_nodes: int = 64) -> Optional[tuple]:
    """(nodes, context) of the fewest nodes, then the smallest context, that fit; None if none does."""
    from distill.registry import family_class

    family = family_class(config.model.family)
    nodes = 1
    while nodes <= max_nodes:
        world = nodes * gpus_per_node
        contexts = (1, 2, 4, 8, 16, 32) if family.supports_context_parallel else (1,)
        for context in [c for c in contexts if world % c == 0]:
            config.parallel.context = context
            if family.check(config):
                continue  # the heads or tokens do not split this way
            layout = Layout(world, 1, context)
            if make_plan(config, adapter, layout, gpu_memory_gib(config)).fits:
                return nodes, context
        nodes *= 2
    return None


def describe(plan: Plan) -> str:
    lay = plan.layout
    lines = [
        f"memory plan per GPU: {lay.world} rank(s), weights sharded over {lay.fsdp}, context {lay.context}; "
        f"{plan.tokens} tokens per sample, {plan.tokens // lay.context} per rank",
        f"{'role':<10}{'params':>10}{'grads':>10}{'optimizer':>11}{'ema':>8}  activations by phase (GiB)",
    ]
    for r in plan.roles.values():
        acts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in r.activations.items()) or "-"
        cpu = f"  (+{r.cpu / GiB:.2f} GiB in CPU memory)" if r.cpu else ""
        lines.append(f"{r.name:<10}{r.params / GiB:>10.2f}{r.grads / GiB:>10.2f}{r.optimizer / GiB:>11.2f}"
                     f"{r.ema / GiB:>8.2f}  {acts}{cpu}")
    for name, total in plan.phases.items():
        lines.append(f"phase {name}: {total / GiB:.2f} GiB")
    usable = USABLE_FRACTION * plan.gpu_gib
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"peak {plan.peak / GiB:.2f} GiB of {plan.gpu_gib:.0f} GiB per GPU ({usable:.1f} usable): {verdict}")
    return "\n".join(lines)


def gpus_per_node(config: Config) -> int:
    launcher = config.launcher
    if launcher.name.value == "slurm":
        return launcher.tasks_per_node or max(launcher.gpus_per_node, 1)
    return launcher.nproc_per_node


def report(config: Config) -> Tuple[int, str]:
    """(exit code, text): 0 and the plan when it fits; 2 and the plan with what would fit when not."""
    from distill.models import build_adapter

    adapter = build_adapter(config.model)
    plan = make_plan(config, adapter, layout_of(config), gpu_memory_gib(config))
    text = describe(plan)
    gpus = gpus_per_node(config)
    fit = smallest_fit(copy.deepcopy(config), adapter, gpus)
    where = (f"{fit[0]} node(s) x {gpus} GPUs with parallel.context={fit[1]}" if fit
             else f"nothing up to 64 nodes x {gpus} GPUs")
    text += f"\nsmallest that fits ({plan.gpu_gib:.0f} GiB GPUs): {where}"
    if plan.fits:
        return 0, text
    return 2, (f"{text}\nconfig error: the peak of {plan.peak / GiB:.1f} GiB per GPU exceeds the "
               f"{USABLE_FRACTION * plan.gpu_gib:.1f} GiB usable of launcher.gpu_memory_gib={plan.gpu_gib:.0f}")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak: storages the tracked
    modules hold at the start, and every storage an op creates while the mode is
    on, until it is freed (works on the CPU, where the backward runs on this thread)."""

    def __init__(self, modules=()):
        super().__init__()
        self.sizes = WeakIdKeyDictionary()
        self.current = self.peak = 0
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                self.add(t)

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if isinstance(t, DTensor):
            t = t._local_tensor
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage in self.sizes:
            return
        self.sizes[storage] = size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self.free, size)

    def free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def measured_peak(trainer, iterations: int) -> float:
    """The most bytes of tensors this rank held over `iterations` training iterations:
    what the plan is checked against on the CPU."""
    with LiveTensorBytes([role.module for role in trainer.roles.values()]) as live:
        for iteration in range(iterations):
            trainer.train_step(iteration)
    return float(live.peak)
