"""benchmarks/gpu_step.py runs on the CPU at the tiny size (its smoke test)."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_gpu_step_benchmark_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--size", "tiny", "--iters", "4",
                             "--warmup", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== tiny, unsharded, cpu" in out and "== tiny, fsdp2 x 1 rank, cpu" in out
    for layout in out.split("== ")[1:]:
        generators = re.search(r"generator [\d.]+ s x (\d+), critic [\d.]+ s x (\d+)", layout)
        assert generators and int(generators.group(1)) + int(generators.group(2)) == 4, layout
        flops = re.search(r"FLOPs per iteration \(mean over these\): model ([\d.e+]+), hardware ([\d.e+]+)", layout)
        model, hardware = float(flops.group(1)), float(flops.group(2))
        assert 0 < model < hardware, layout  # full checkpointing recomputes the blocks' forwards
        for phase in ("student forwards", "teacher forwards", "critic forwards", "backward", "optimizer", "EMA",
                      "logging", "other"):
            assert re.search(rf"  {phase}.* s/it", layout), (phase, layout)
        for role in ("student", "teacher", "critic"):
            assert re.search(rf"  {role} +parameters +[\d.]+ MiB", layout), (role, layout)
        assert re.search(r"checkpoint stall: background [\d.]+ s", layout)
