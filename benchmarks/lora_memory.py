"""Memory of full-weight against LoRA DMD2 roles at Wan2.1 sizes, and the
step-time cost of LoRA on the tiny model.

Each role is built on the meta device by the project's own role pipeline
(load at the role's storage dtype -> LoRA converter), so the dtypes counted
are the ones training uses: trained weights fp32 masters, frozen weights (the
teacher, a LoRA role's base) bf16. Per rank with FSDP2 over N ranks:
weights + gradients (fp32, trained only) + AdamW moments (2 x fp32, trained
only), divided by N. Activations are not counted.

    python benchmarks/lora_memory.py [--iters 100]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config.schema import LoraConfig, ModelConfig, Precision, RoleConfig  # noqa: E402
from distill.models import build_adapter  # noqa: E402
from distill.roles import prepare, storage_dtype  # noqa: E402

COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
SIZES = {
    "Wan2.1-1.3B": dict(COMMON, num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
    "Wan2.1-14B": dict(COMMON, num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
}
RANKS = (1, 8)
GIB = 2**30


def role_bytes(arch: dict, cfg: RoleConfig):
    """(trained parameters, bytes of weights + grads + AdamW) of one role, unsharded."""
    adapter = build_adapter(ModelConfig(arch=arch))
    with init_empty_weights(include_buffers=False):
        module = prepare(adapter.empty(None, storage_dtype(cfg)), cfg, adapter, seed=0)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    trained = [p for p in module.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    return n_trained, weights + sum(3 * p.numel() * 4 for p in trained)  # grad + 2 moments, fp32


VARIANTS = [("full", 0, False), ("LoRA r32", 32, False), ("LoRA r64", 64, False), ("LoRA r128", 128, False),
            ("LoRA r64, critic on teacher", 64, True)]


def memory_table() -> None:
    teacher = RoleConfig(precision=Precision.bf16)
    for size, arch in SIZES.items():
        print(f"\n{size}: bf16 compute; GiB per rank = (weights + grads + AdamW) / ranks")
        print(f"{'student & critic':<29}{'role':<9}{'trained':>10}" + "".join(f"{f'@{n} rank':>10}" for n in RANKS)
              + f"{'3 roles @1':>12}{'@8':>7}")
        teacher_row = role_bytes(arch, teacher)
        full_total = None
        for variant, rank, shared in VARIANTS:
            trainable = RoleConfig(trainable=True, precision=Precision.bf16, lora=LoraConfig(rank=rank))
            student = role_bytes(arch, trainable)
            # a critic over the teacher's network adds only its adapters and their state
            critic = (student[0], student[1] - teacher_row[1]) if shared else student
            rows = {"student": student, "critic": critic, "teacher": teacher_row}
            total = sum(b for _, b in rows.values())
            full_total = full_total or total
            for i, (role, (n, b)) in enumerate(rows.items()):
                tail = f"{total / GIB:>12.1f}{total / 8 / GIB:>7.1f}  {total / full_total:.2f}x of full" if i == 0 else ""
                print(f"{variant if i == 0 else '':<29}{role:<9}{n / 1e6:>9.1f}M"
                      + "".join(f"{b / n_ranks / GIB:>10.2f}" for n_ranks in RANKS) + tail)


def step_time_ratio(iters: int) -> None:
    """Median DMD2 iteration of the tiny Wan, full vs LoRA rank 8 on student and
    critic, interleaved so machine noise hits both alike."""
    from hydra import compose, initialize_config_dir

    from distill.config import register_configs, validate
    from distill.run import build_trainer

    register_configs()
    base = ["experiment=tiny", "logger=none", "validation.num_samples=1", "method.generator_update_interval=1",
            "data.batch_size=2", "training.max_steps=1000000", "logger.progress_bar=false"]
    lora = ["roles.student.lora.rank=8", "roles.critic.lora.rank=8"]
    trainers, times = {}, {"full": [], "lora": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("full", []), ("lora", lora)):
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
                cfg = compose(config_name="config", overrides=base + extra)
            (Path(tmp) / name).mkdir()
            trainers[name] = build_trainer(validate(cfg), Path(tmp) / name)
        for i in range(iters + 10):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_step(i)
                if i >= 10:  # warm-up
                    times[name].append(time.perf_counter() - start)
    full, lo = statistics.median(times["full"]), statistics.median(times["lora"])
    print(f"\ntiny Wan DMD2 iteration (batch 2, generator every iteration, {iters} interleaved, medians): "
          f"full {full * 1e3:.1f} ms, LoRA r8 {lo * 1e3:.1f} ms: ratio {lo / full:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    memory_table()
    step_time_ratio(args.iters)


if __name__ == "__main__":
    main()
