"""The embedded default's quality bar: distil the shipped digits teacher into
a 2-step student (exactly `python launch.py`) and compare, on 256 fixed
validation prompts, the teacher at 50 Euler steps, the teacher at 2 steps,
the student at 2 steps and real clips.

    python benchmarks/demo_quality.py [--record FILE] [--keep-export DIR] [extra Hydra overrides]

Prints the table, the student's ratios to both teacher rows (FD: lower is
better; accuracy: higher is better), the student's scores at every
validation, and the wall time. --record writes all of it as JSON with the
date, the git commit (and whether the tree was dirty) and the overrides, so
that figures quoted elsewhere can be checked; --keep-export copies the
exported student there.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import register_configs, validate  # noqa: E402
from distill.run import train  # noqa: E402


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "distill", "conf"))}


def validations(run_dir: Path) -> list:
    """The student's scores at each validation step, from metrics.jsonl."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val/student_2step/accuracy" in record:
            rows.append({"step": record["step"], "accuracy": record["val/student_2step/accuracy"],
                         "frechet_distance": record["val/student_2step/frechet_distance"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path)
    parser.add_argument("--keep-export", type=Path)
    args, overrides = parser.parse_known_args()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none", "logger.progress_bar=false", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        start = time.perf_counter()
        history = train(validate(cfg), run_dir).validator.history
        minutes = (time.perf_counter() - start) / 60
        over_time = validations(run_dir)
        if args.keep_export:
            shutil.rmtree(args.keep_export, ignore_errors=True)
            shutil.copytree(run_dir / "export" / "student", args.keep_export)
    m = {k.split("/", 1)[1]: v for k, v in history.items()}
    student = "student_2step"
    ratios = {}
    print()
    for ref in ("teacher_2step", "teacher_50step"):
        fd = m[f"{student}/frechet_distance"] / m[f"{ref}/frechet_distance"]
        acc = m[f"{student}/accuracy"] / m[f"{ref}/accuracy"]
        ratios[ref] = {"frechet_distance": fd, "accuracy": acc}
        print(f"student / {ref:<15} FD ratio {fd:5.2f}   accuracy ratio {acc:5.2f}")
    for row in over_time:
        print(f"student at step {row['step']:>5}: accuracy {row['accuracy']:.3f}  FD {row['frechet_distance']:.1f}")
    print(f"wall time {minutes:.1f} min (training, validations, export)")
    if args.record:
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **git_state(),
                  "overrides": overrides, "final": m, "student_ratios": ratios, "student_over_time": over_time,
                  "wall_time_min": round(minutes, 2)}
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded in {args.record}")


if __name__ == "__main__":
    main()
