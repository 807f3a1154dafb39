"""Evaluate a student (or its teacher) on a prompt file, as papers do.

    python -m distill.evaluate TARGET --prompts FILE [--out DIR] [--samples 5] [--seed 0]
        [--clip-model DIR] [--i3d-model FILE --fvd-reference DIR] [--vbench-cache DIR] [--metrics ...]
    python -m distill.evaluate RUN --prompts FILE --role teacher [--steps 50]    # the teacher, same seeds
    torchrun --nproc-per-node 8 -m distill.evaluate TARGET --prompts FILE        # sharded over ranks
    python -m distill.evaluate TARGET --prompts FILE launcher=slurm [launcher.KEY=VALUE ...] [--array N]
    python -m distill.evaluate RUN --prompts FILE --watch                        # each checkpoint as it lands

TARGET: an export (<run>/export/student), a checkpoint folder, or a run folder
(its newest complete checkpoint). Every prompt is sampled --samples times,
video i from seed --seed + i, and written as <out>/videos/{prompt}-{index}.mp4
(VBench's names: `vbench evaluate --videos_path <out>/videos` runs unchanged).
A rerun skips the videos on disk. When all are written, the metrics whose
networks are given (or those --metrics lists) go into <out>/metrics.json with
the commit, the training config's hash, the seeds and the sampler.

Default <out>: <run>/eval/checkpoint-N for a checkpoint's student,
<run>/eval/<role>-<K>step for another role, <export>/eval for an export.
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from distill.config.schema import EvaluateConfig
from distill.evaluation import metrics as metric_registry
from distill.evaluation.prompts import PromptFileError, read_prompts
from distill.evaluation.scoring import EvaluationMismatch, claim_folder, sample_share, score, spec
from distill.evaluation.targets import TargetError, device_for, resolve

log = logging.getLogger("distill.evaluate")
EVAL_KEYS = ("prompts", "samples", "seed", "fps", "negative_prompt", "metrics", "clip_model", "i3d_model",
             "fvd_reference", "vbench_cache", "vbench_dimensions")


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    parser.add_argument("--prompts", required=True, help="plain text (a prompt a line) or VBench's JSON list")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--role", default="student", help="a checkpoint's role (teacher: at --steps Euler steps)")
    parser.add_argument("--steps", type=int, help="Euler roles only (the teacher: default validation.teacher_steps)")
    parser.add_argument("--guidance", type=float, help="the teacher's CFG (default: the run's validation guidance)")
    parser.add_argument("--ema", action="store_true", help="the role's EMA weights")
    parser.add_argument("--samples", type=int, default=1, help="videos per prompt (VBench: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--metrics", nargs="+", default=[], help=f"of {', '.join(metric_registry.NEEDS)} "
                        "(default: each whose paths are given)")
    parser.add_argument("--clip-model", help="CLIP folder (transformers) for clip_score")
    parser.add_argument("--i3d-model", help="I3D (TorchScript or state dict) for fvd")
    parser.add_argument("--fvd-reference", help="folder of reference videos for fvd")
    parser.add_argument("--vbench-cache", help="VBENCH_CACHE_DIR for vbench")
    parser.add_argument("--vbench-dimensions", nargs="+", default=[])
    parser.add_argument("--shard", help="I/N: write only shard I of N (a job array's element)")
    parser.add_argument("--array", type=int, default=0, help="with launcher=slurm: N single-task jobs, one shard each")
    parser.add_argument("--watch", action="store_true", help="score each checkpoint of the run as it completes")
    parser.add_argument("--poll-s", type=float, default=30, help="--watch: seconds between looks")
    parser.add_argument("--idle-timeout-min", type=float, default=120,
                        help="--watch: stop after this long without a new checkpoint")
    parser.add_argument("overrides", nargs="*", help="launcher=slurm and launcher.KEY=VALUE")
    return parser.parse_intermixed_args(argv)


def evaluate_config(args) -> EvaluateConfig:
    return EvaluateConfig(**{k: getattr(args, k) for k in EVAL_KEYS})


def default_out(target) -> Path:
    if target.kind == "export":
        return target.path / "eval"
    run = target.path.parent
    if target.role_name == "student":
        return run / "eval" / target.path.name
    return run / "eval" / f"{target.role_name}-{target.sampler.num_steps}step"


def ranks(args) -> tuple:
    """(rank, world, from torchrun): --shard I/N, or torchrun's environment."""
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        if not 0 <= i < n:
            raise ValueError(f"--shard {args.shard}: I must be in 0..N-1")
        return i, n, False
    world = int(os.environ.get("WORLD_SIZE", 1))
    return int(os.environ.get("RANK", 0)), world, world > 1


def check_inputs(args, cfg: EvaluateConfig) -> List[str]:
    prompts = read_prompts(Path(args.prompts))
    found = metric_registry.problems(cfg, prompts)
    if found:
        raise metric_registry.MetricSetupError("\n".join(found))
    if args.samples < 1:
        raise ValueError(f"--samples {args.samples}: at least 1")
    return prompts


def evaluate_once(args, cfg: EvaluateConfig, prompts: List[str], target_path: Path, out: Optional[Path] = None,
                  metrics: Optional[list] = None):
    """Sample this rank's share and, when all videos are in, score them (with `metrics`, those
    built once by the watcher); the metrics or None."""
    rank, world, distributed = ranks(args)
    device = device_for(int(os.environ.get("LOCAL_RANK", 0)))
    target = resolve(target_path, args.role, args.steps, args.guidance, args.ema)
    target.role.module.to(device)
    out = out or args.out or default_out(target)
    if rank == 0 or not distributed:
        claim_folder(out, spec(target, cfg, prompts))
    if distributed:
        barrier()
    written = sample_share(target, cfg, prompts, out, rank, world)
    log.info("rank %d of %d: %d videos written into %s", rank, world, written, out / "videos")
    if distributed:
        barrier()
        if rank != 0:
            return None
    result = score(target, cfg, prompts, out, device, metrics)
    if result is None:
        print(f"shard {rank}/{world} written into {out}; the metrics come when every shard is in")
    return result


def barrier() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = evaluate_config(args)
    try:
        prompts = check_inputs(args, cfg)
        if args.overrides:
            from distill.evaluation.submit import submit

            return submit(args, argv if argv is not None else sys.argv[1:])
        if args.watch:
            from distill.evaluation.watch import watch

            return watch(args, cfg, prompts)
        result = evaluate_once(args, cfg, prompts, args.target)
        close_group()
    except (PromptFileError, metric_registry.MetricSetupError, TargetError, EvaluationMismatch, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print_result(result)
    return 0


def print_result(result: dict) -> None:
    print(f"{result['videos']} videos of {result['num_prompts']} prompts ({result['role']}, "
          f"{len(result['sampler']['sigmas'])} steps)")
    for name, value in result["metrics"].items():
        print(f"  {name}: {value:.4f}")


if __name__ == "__main__":
    sys.exit(main())
