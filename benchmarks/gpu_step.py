"""The real trainer's DMD2 iteration at a named size: time, FLOPs, MFU, memory, phases.

    python benchmarks/gpu_step.py                       # Wan2.1-T2V-1.3B, 81x480x832, random weights
    python benchmarks/gpu_step.py --path DIR            # real weights (a diffusers folder)
    python benchmarks/gpu_step.py --size tiny --iters 3 --warmup 1   # CPU smoke test (CI)

The recipe is experiment=wan21_t2v_1.3b_dmd2_3step on random latents of the
named size (bf16 over fp32 masters, full activation checkpointing on student
and critic, a generator update every 5 iterations); extra Hydra overrides
follow `--`. Two layouts are measured one after the other, each in a fresh
trainer: unsharded, and FSDP2 over a process group of one with bf16
parameters (parallel.shard_single_rank).

Printed per layout:
  - iteration time (median), generator and critic iterations apart;
  - FLOPs per iteration counted with torch.utils.flop_counter over one
    generator and one critic iteration: hardware FLOPs (what ran, activation
    recomputation included) and model FLOPs (without the recomputation: the
    first forward of every checkpointed call, counted as it runs, is what the
    backward runs again); MFU and HFU against the device's dense bf16 peak;
  - peak memory, and per role the resident parameters, gradients, optimizer
    state and EMA; activations are the peak less everything resident;
  - time per phase (student/rollout, teacher, critic forwards; backward;
    optimizer; EMA; logging), each timed with a device synchronisation around
    it in separate iterations, so the phases add up to more than a plain one;
  - the stall of one checkpoint save, background (checkpoint.async_save) and
    foreground, in iterations.
"""

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import register_configs, validate  # noqa: E402
from distill.models.wan import PUBLIC_ARCHITECTURES  # noqa: E402
from distill.run import build_trainer  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), FLOP/s
PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}
WAN13B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SIZES = {
    "1.3b": ["experiment=wan21_t2v_1.3b_dmd2_3step", "data=synthetic", "data.num_samples=2"],
    "tiny": ["experiment=tiny", "roles.student.ema_decay=0.99", "roles.student.activation_checkpointing=full", "roles.critic.activation_checkpointing=full",
             "method.generator_update_interval=2"],
}
COMMON = ["logger=none", "logger.progress_bar=false", "validation.every=0", "checkpoint.every=0", "training.max_steps=1000000",
          "training.export_at_end=false"]
LAYOUTS = {"unsharded": [], "fsdp2 x 1 rank": ["parallel.shard_single_rank=true"]}


def compose_run(args, layout: list):
    register_configs()
    overrides = [*SIZES[args.size], *COMMON, *layout, *args.overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    if args.size == "1.3b":
        frames, height, width = args.frames, args.height, args.width
        cfg.model.latent_shape = [16, (frames - 1) // 4 + 1, height // 8, width // 8]
        if args.path:
            cfg.model.path = args.path
        else:  # random weights of the public architecture
            cfg.model.path = None
            cfg.model.arch = OmegaConf.create(dict(PUBLIC_ARCHITECTURES[WAN13B]))
    return validate(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_generator(trainer, iteration: int) -> bool:
    return "student" in trainer.method.roles_to_step(iteration)


def timed_iterations(trainer, count: int):
    """[(generator?, seconds)] of `count` iterations, each synchronised."""
    device, out = trainer.runtime.device, []
    for _ in range(count):
        generator = is_generator(trainer, trainer.step)
        sync(device)
        start = time.perf_counter()
        trainer.advance()
        sync(device)
        out.append((generator, time.perf_counter() - start))
    return out


@contextmanager
def recompute_counter(trainer, counter):
    """Adds to counter["recompute"] the FLOPs of every checkpointed call's first forward."""
    originals = {}
    for role in trainer.roles.values():
        for module in role.module.modules():
            fn = getattr(module, "_gradient_checkpointing_func", None)
            if fn is None or not getattr(module, "gradient_checkpointing", False) or module in originals:
                continue

            def counted(*args, _fn=fn, **kwargs):
                before = counter["mode"].get_total_flops()
                out = _fn(*args, **kwargs)
                counter["recompute"] += counter["mode"].get_total_flops() - before
                return out

            originals[module] = fn
            module._gradient_checkpointing_func = counted
    try:
        yield
    finally:
        for module, fn in originals.items():
            module._gradient_checkpointing_func = fn


def count_flops(trainer, generator: bool):
    """(hardware, model) FLOPs of the next iteration of that kind (others run uncounted)."""
    from torch.utils.flop_counter import FlopCounterMode

    while is_generator(trainer, trainer.step) != generator:
        trainer.advance()
    counter = {"mode": FlopCounterMode(display=False), "recompute": 0}
    with recompute_counter(trainer, counter), counter["mode"]:
        trainer.advance()
    total = counter["mode"].get_total_flops()
    return total, total - counter["recompute"]


def tensor_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def resident_memory(trainer):
    """Per role: bytes of parameters, gradients (as the backward makes them), optimizer state, EMA."""
    rows = {}
    for name, role in trainer.roles.items():
        params = list(role.module.parameters())
        trained = [p for p in params if p.requires_grad] if role.trainable else []
        optim = [v for state in (role.optimizer.state.values() if role.optimizer else []) for v in state.values()
                 if torch.is_tensor(v)]
        rows[name] = {"parameters": tensor_bytes(params), "gradients": tensor_bytes(trained),
                      "optimizer": tensor_bytes(optim), "ema": tensor_bytes(role.ema.shadow.values()) if role.ema else 0}
    return rows


@contextmanager
def phase_timers(trainer, times):
    """Synchronised timers around role forwards, backward, optimizer steps, EMA, logging."""
    device = trainer.runtime.device
    handles, patched = [], []

    def timer(key, fn):
        def run(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            times[key] = times.get(key, 0.0) + time.perf_counter() - start
            return out
        return run

    def patch(owner, attr, key):
        original = getattr(owner, attr)
        patched.append((owner, attr, original))
        setattr(owner, attr, timer(key, original))

    starts = {}
    forward_key = {"student": "student forwards (rollout + generator)", "teacher": "teacher forwards",
                   "critic": "critic forwards"}
    for name, role in trainer.roles.items():
        key = forward_key.get(name, f"{name} forwards")

        def pre(module, args, _key=key):
            sync(device)
            starts[_key] = time.perf_counter()

        def post(module, args, out, _key=key):
            sync(device)
            times[_key] = times.get(_key, 0.0) + time.perf_counter() - starts[_key]

        handles += [role.module.register_forward_pre_hook(pre), role.module.register_forward_hook(post)]
        if role.optimizer is not None:
            patch(role.optimizer, "step", "optimizer")
        if role.ema is not None:
            patch(role.ema, "update", "EMA")
    patch(torch.Tensor, "backward", "backward (recomputation included)")
    patch(trainer, "log_window", "logging")
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


def checkpoint_stall(trainer, background: bool) -> float:
    ckpt = trainer.checkpointer
    ckpt.background = background
    trainer.advance()  # a step of its own: one checkpoint per step
    sync(trainer.runtime.device)
    start = time.perf_counter()
    ckpt.save(trainer.step)
    stall = time.perf_counter() - start
    ckpt.wait()
    return stall


def peak_flops(device: torch.device, given: float):
    if given:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def measure(args, layout_name: str, layout: list) -> None:
    from distill.tracking import peak_memory_gb

    config = compose_run(args, layout)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(config, run_dir)
        device = trainer.runtime.device
        try:
            timed_iterations(trainer, args.warmup)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs = timed_iterations(trainer, args.iters)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            gen_flops = count_flops(trainer, True)
            critic_flops = count_flops(trainer, False)
            times = {}
            with phase_timers(trainer, times):
                phased = timed_iterations(trainer, args.iters)
            stalls = {b: checkpoint_stall(trainer, b) for b in (True, False)}
            report(args, layout_name, trainer, runs, gen_flops, critic_flops, peak, times, phased, stalls, device)
            if peak is None:
                print(f"  process peak RSS {peak_memory_gb(device):.2f} GiB (CPU: no device allocator)")
        finally:
            trainer.checkpointer.close()
            trainer.tracker.close()
            trainer.runtime.shutdown()


def report(args, layout_name, trainer, runs, gen_flops, critic_flops, peak, times, phased, stalls, device):
    gen = [t for g, t in runs if g]
    crit = [t for g, t in runs if not g]
    all_t = [t for _, t in runs]
    print(f"\n== {args.size}, {layout_name}, {device}, {len(runs)} iterations after {args.warmup} warm-up ==")
    print(f"iteration median {statistics.median(all_t):.3f} s (mean {statistics.mean(all_t):.3f} s); "
          f"generator {statistics.median(gen) if gen else float('nan'):.3f} s x {len(gen)}, "
          f"critic {statistics.median(crit) if crit else float('nan'):.3f} s x {len(crit)}")
    hw = sum(gen_flops[0] if g else critic_flops[0] for g, _ in runs)
    model = sum(gen_flops[1] if g else critic_flops[1] for g, _ in runs)
    seconds = sum(all_t)
    print(f"FLOPs per iteration (mean over these): model {model / len(runs):.3e}, hardware {hw / len(runs):.3e} "
          f"(generator {gen_flops[1]:.3e} / {gen_flops[0]:.3e}, critic {critic_flops[1]:.3e} / {critic_flops[0]:.3e})")
    peak_rate = peak_flops(device, args.peak_tflops)
    achieved = model / seconds
    if peak_rate:
        print(f"MFU {100 * achieved / peak_rate:.1f}%  HFU {100 * hw / seconds / peak_rate:.1f}%  "
              f"({achieved / 1e12:.1f} TFLOP/s of {peak_rate / 1e12:.0f})")
    else:
        print(f"model FLOP/s {achieved / 1e12:.3f} T (no peak known for {device}: --peak-tflops)")
    resident = resident_memory(trainer)
    total_resident = 0
    for name, row in resident.items():
        total_resident += row["parameters"] + row["optimizer"] + row["ema"]
        print(f"  {name:8s} parameters {row['parameters'] / 2**20:9.1f} MiB  gradients {row['gradients'] / 2**20:9.1f} MiB"
              f"  optimizer {row['optimizer'] / 2**20:9.1f} MiB  EMA {row['ema'] / 2**20:8.1f} MiB")
    if peak is not None:
        print(f"peak memory {peak / 2**30:.2f} GiB: resident {total_resident / 2**30:.2f} GiB, activations and "
              f"gradients in flight {(peak - total_resident) / 2**30:.2f} GiB")
    phased_total = sum(t for _, t in phased)
    print(f"phases over {len(phased)} synchronised iterations ({phased_total:.3f} s):")
    for key, value in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {key:40s} {value / len(phased):.4f} s/it  {100 * value / phased_total:5.1f}%")
    other = phased_total - sum(times.values())
    print(f"  {'other (data, losses, clipping, host)':40s} {other / len(phased):.4f} s/it  {100 * other / phased_total:5.1f}%")
    iteration = statistics.median(all_t)
    print(f"checkpoint stall: background {stalls[True]:.3f} s ({stalls[True] / iteration:.2f} iterations), "
          f"foreground {stalls[False]:.3f} s ({stalls[False] / iteration:.2f} iterations)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    parser.add_argument("--path", help="a diffusers Wan2.1-T2V-1.3B folder (default: random weights)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layout", choices=["both", *LAYOUTS], default="both")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak, if not known")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = parser.parse_args(argv)
    for name, layout in LAYOUTS.items():
        if args.layout in ("both", name):
            measure(args, name, layout)


if __name__ == "__main__":
    main()
