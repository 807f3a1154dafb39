"""The embedded default's quality bar: distil the shipped digits teacher into
a 2-step student (exactly `python launch.py`: DMD2 with its GAN term, 1,500
iterations, validating every 250 steps) and score, on 256 fixed validation
prompts, the teacher at 50 Euler steps, the teacher at 2 steps, the student at
2 steps and real clips.

    python benchmarks/demo_quality.py [--seeds 0 1 2] [--variant NAME='OVERRIDES' | --variant NAME ...]
                                      [--record FILE] [--keep-export DIR] [extra Hydra overrides]

Validation swings by several points of Frechet distance from one step to the
next, so each variant's student is scored by its mean over its last 2
validations (as the demo's table's "last 2" row), then averaged over the
seeds, with the spread (the sample standard deviation over seeds). The
variants default to the embedded default (`dmd2_gan`) and the plain DMD2 it
replaced (`method.gan.enabled=false training.max_steps=2000`), run one after
the other on the same seeds, so their wall times compare. `--variant dmd2_gan
--variant rcm_2step --variant rcm_1step` puts rCM (experiment=digits_rcm) beside
the default, with each row's prompt diversity (how far apart one prompt's clips
are, in the classifier's features; real clips and teachers too).
`seed` moves the training noise, the data order and which training clips
the digits set draws; the validation prompts (`validation.seed`) and the
metric classifier stay fixed.

--record writes every figure as JSON with the date and the git commit (and
whether the tree was dirty); --keep-export copies the first variant's
first-seed student export there.
"""

import argparse
import json
import re
import shutil
import statistics
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

DEFAULT_VARIANTS = {"dmd2_gan": [], "dmd2": ["method.gan.enabled=false", "training.max_steps=2000"]}
# rCM in the demo's place (experiment=digits_rcm), at 2 and at 1 step
RCM_VARIANTS = {"rcm_2step": ["experiment=digits_rcm"],
                "rcm_1step": ["experiment=digits_rcm", "method.student_steps=[1000]"]}
LAST_VALIDATIONS = 2
REFERENCES = ("teacher_50step", "real")  # and the teacher at the student's step count
# prompt_diversity: for each validation prompt that several clips share, the mean distance
# between their classifier features, averaged over prompts (distill/validation/digit_metrics.py);
# every row has it. diversity: run health's, one prompt's clips over 4 seeds, in pixels
# (the student and the 50-step teacher only)
METRICS = ("accuracy", "frechet_distance", "prompt_diversity", "diversity")


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "distill", "conf"))}


def validation_records(run_dir: Path) -> tuple:
    """(the student's row name, e.g. student_2step; its validation records)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    student = next(m.group(1) for r in records for k in r if (m := re.fullmatch(r"val/(student_\d+step)/accuracy", k)))
    return student, [r for r in records if f"val/{student}/accuracy" in r]


def one_run(overrides: list, keep_export=None) -> dict:
    """Train once; the student's last validations, the references, the wall time."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["logger=none", "logger.progress_bar=false", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        history = train(validate(cfg), tmp).validator.history
        minutes = (time.perf_counter() - start) / 60
        name, records = validation_records(Path(tmp))
        student = [{"step": r["step"], **{k: r[f"val/{name}/{k}"] for k in METRICS if f"val/{name}/{k}" in r}}
                   for r in records]
        if keep_export:
            shutil.rmtree(keep_export, ignore_errors=True)
            shutil.copytree(Path(tmp) / "export" / "student", keep_export)
    last = student[-LAST_VALIDATIONS:]
    return {
        "student_over_time": student,
        "student_last_mean": {k: statistics.mean(r[k] for r in last) for k in METRICS if k in last[0]},
        "student": name,
        "references": {ref: {k: history[f"val/{ref}/{k}"] for k in METRICS if f"val/{ref}/{k}" in history}
                       for ref in (*REFERENCES, name.replace("student", "teacher"))},
        "wall_time_min": round(minutes, 2),
    }


def spread(values: list) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list) -> dict:
    def metrics(row: dict) -> list:
        return [k for k in METRICS if k in row]

    out = {name: {k: spread([r["references"][name][k] for r in runs]) for k in metrics(row)}
           for name, row in runs[0]["references"].items()}
    out[runs[0]["student"]] = {k: spread([r["student_last_mean"][k] for r in runs])
                               for k in metrics(runs[0]["student_last_mean"])}
    out["wall_time_min"] = spread([r["wall_time_min"] for r in runs])
    return out


def print_table(name: str, summary: dict) -> None:
    print(f"\n{name}: mean over seeds (sd); the student over its last {LAST_VALIDATIONS} validations")
    print(f"{'':<30}{'accuracy':>18}{'Frechet distance':>22}{'prompt diversity':>20}{'diversity':>20}")
    student = next(row for row in summary if row.startswith("student_"))
    for row in ("real", "teacher_50step", student.replace("student", "teacher"), student):
        text = "".join(f"{c['mean']:>{w}.{d}f} ({c['sd']:.{d}f})" if c else " " * (w + 4 + d)
                       for c, d, w in ((summary[row].get(k), d, w) for k, d, w in
                                       zip(METRICS, (3, 1, 2, 3), (10, 14, 12, 12))))
        print(f"{row:<30}{text}")
    s, t50 = summary[student]["frechet_distance"]["mean"], summary["teacher_50step"]["frechet_distance"]["mean"]
    print(f"student FD / teacher 50-step FD {s / t50:.2f}; wall time {summary['wall_time_min']['mean']:.1f} min a run")


def parse_variants(items: list) -> dict:
    """NAME='overrides ...', or the NAME of a known variant (DEFAULT_VARIANTS, RCM_VARIANTS)."""
    if not items:
        return DEFAULT_VARIANTS
    known = {**DEFAULT_VARIANTS, **RCM_VARIANTS}
    return {item.split("=", 1)[0]: item.split("=", 1)[1].split() if "=" in item else known.get(item, [])
            for item in items}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", default=[], help="NAME='override override ...'")
    parser.add_argument("--record", type=Path)
    parser.add_argument("--keep-export", type=Path)
    args, common = parser.parse_known_args()
    register_configs()
    variants = parse_variants(args.variant)
    results = {}
    for i, (name, overrides) in enumerate(variants.items()):
        runs = []
        for j, seed in enumerate(args.seeds):
            keep = args.keep_export if i == 0 and j == 0 else None
            runs.append(one_run([*common, *overrides, f"seed={seed}"], keep))
            last = runs[-1]["student_last_mean"]
            print(f"{name} seed {seed}: student accuracy {last['accuracy']:.3f}, FD {last['frechet_distance']:.1f}, "
                  f"prompt diversity {last.get('prompt_diversity', float('nan')):.2f}, "
                  f"diversity {last.get('diversity', float('nan')):.3f} ({runs[-1]['wall_time_min']:.1f} min)", flush=True)
        results[name] = {"overrides": overrides, "runs": runs, "summary": summarise(runs)}
    for name, result in results.items():
        print_table(name, result["summary"])
    if args.record:
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **git_state(),
                  "common_overrides": common, "seeds": args.seeds, "variants": results}
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded in {args.record}")


if __name__ == "__main__":
    main()
