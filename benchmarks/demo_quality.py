"""The embedded default's quality bar: distil the shipped digits teacher into
a 2-step student (exactly `python launch.py`) and compare, on 256 fixed
validation prompts, the teacher at 50 Euler steps, the teacher at 2 steps,
the student at 2 steps and real clips.

    python benchmarks/demo_quality.py [extra Hydra overrides]

Prints the table, then the student's ratios to both teacher rows (FD: lower
is better; accuracy: higher is better) and the wall time.
"""

import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import register_configs, validate  # noqa: E402
from distill.run import train  # noqa: E402


def main() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        history = train(validate(cfg), run_dir).validator.history
        minutes = (time.perf_counter() - start) / 60
    m = {k.split("/", 1)[1]: v for k, v in history.items()}
    student = "student_2step"
    print()
    for ref in ("teacher_2step", "teacher_50step"):
        fd = m[f"{student}/frechet_distance"] / m[f"{ref}/frechet_distance"]
        acc = m[f"{student}/accuracy"] / m[f"{ref}/accuracy"]
        print(f"student / {ref:<15} FD ratio {fd:5.2f}   accuracy ratio {acc:5.2f}")
    print(f"wall time {minutes:.1f} min (training, validations, export)")


if __name__ == "__main__":
    main()
