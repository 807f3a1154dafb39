"""Evaluation as SLURM jobs, through submitit as training is:

    python -m distill.evaluate TARGET --prompts FILE launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8
        one job of nodes x tasks ranks, each sampling its share (torchrun's variables set per task)
    python -m distill.evaluate TARGET --prompts FILE launcher=slurm --array 16
        a job array of 16 one-task jobs, element i writing shard i/16; the last to finish scores

and, with validation.evaluate.watcher=true, the watcher job that launch.py
submits beside a training run (`watcher_argv`), starting once training starts
(sbatch --dependency=after:JOB)."""

from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from distill.config.schema import EvaluateConfig, LauncherConfig

CONF = Path(__file__).resolve().parents[2] / "conf" / "launcher"
FLAG_KEYS = ("clip_model", "i3d_model", "fvd_reference", "vbench_cache")


def launcher_config(overrides: List[str]) -> LauncherConfig:
    """launcher=slurm and launcher.KEY=VALUE, over conf/launcher/slurm.yaml."""
    if "launcher=slurm" not in overrides:
        raise ValueError(f"unknown arguments {' '.join(overrides)}: the evaluation takes launcher=slurm "
                         "and launcher.KEY=VALUE")
    keys = [o.split("launcher.", 1)[1] for o in overrides if o.startswith("launcher.")]
    rest = [o for o in overrides if o != "launcher=slurm" and not o.startswith("launcher.")]
    if rest:
        raise ValueError(f"unknown arguments {' '.join(rest)}: only launcher.KEY=VALUE go with launcher=slurm")
    node = OmegaConf.merge(OmegaConf.structured(LauncherConfig), OmegaConf.load(CONF / "slurm.yaml"),
                           OmegaConf.from_dotlist(keys))
    return OmegaConf.to_object(node)


def job_entry(argv: List[str]) -> None:
    """Runs on every task of an evaluation job."""
    import sys

    from distill.evaluate import main
    from distill.slurm import set_rank_environment

    set_rank_environment()
    code = main(argv)
    if code != 0:
        sys.exit(code)


def own_argv(argv: List[str]) -> List[str]:
    """The command line without what only the submission reads (overrides, --array N)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--array":
            skip = True
        elif not (a == "launcher=slurm" or a.startswith("launcher.") or a.startswith("--array=")):
            out.append(a)
    return out


def submit(args, argv: List[str]) -> int:
    from distill.slurm import make_executor, missing_slurm, sbatch_script

    cfg = launcher_config(args.overrides)
    if not cfg.dry_run and missing_slurm():
        raise ValueError(missing_slurm())
    base = args.out or (Path(args.target) / "eval" if (Path(args.target) / "distill.json").is_file()
                        else _run_folder(Path(args.target)) / "eval")
    job_argv = own_argv(argv)
    if args.array:
        cfg.nodes, cfg.tasks_per_node, cfg.gpus_per_node = 1, 1, min(cfg.gpus_per_node, 1)
    executor = make_executor(cfg, Path(base) / "slurm", None)
    if cfg.dry_run:
        if args.array:
            print(f"# a job array of {args.array} one-task jobs: element i runs --shard i/{args.array}")
        print(sbatch_script(executor))
        return 0
    if args.array:
        jobs = executor.map_array(job_entry, [[*job_argv, "--shard", f"{i}/{args.array}"] for i in range(args.array)])
    else:
        jobs = [executor.submit(job_entry, job_argv)]
    for job in jobs:
        print(f"job {job.job_id}: logs {job.paths.stdout}")
    if cfg.wait:
        for job in jobs:
            job.results()
    return 0


def _run_folder(path: Path) -> Path:
    """A checkpoint's run folder, or the run folder itself."""
    from distill.checkpoint import COMPLETE_MARKER

    return path.parent if (path / COMPLETE_MARKER).is_file() else path


def watcher_argv(run_dir: Path, cfg: EvaluateConfig) -> List[str]:
    """`python -m distill.evaluate RUN --watch` with the run's validation.evaluate settings."""
    argv = [str(run_dir), "--prompts", str(Path(cfg.prompts).resolve()), "--watch", "--samples", str(cfg.samples),
            "--seed", str(cfg.seed), "--fps", str(cfg.fps)]
    for name in FLAG_KEYS:
        if getattr(cfg, name):
            argv += [f"--{name.replace('_', '-')}", str(Path(getattr(cfg, name)).resolve())]
    if cfg.metrics:
        argv += ["--metrics", *cfg.metrics]
    if cfg.vbench_dimensions:
        argv += ["--vbench-dimensions", *cfg.vbench_dimensions]
    if cfg.negative_prompt is not None:
        argv += ["--negative-prompt", cfg.negative_prompt]
    return argv


def submit_watcher(cfg: LauncherConfig, run_dir: Path, evaluate: EvaluateConfig, code_path: Optional[Path],
                   training_job: Optional[str]) -> Optional[str]:
    """The watcher job (one task, one GPU) beside a training run; in a dry run its sbatch script."""
    import dataclasses

    from distill.slurm import make_executor, sbatch_script

    one = dataclasses.replace(cfg, nodes=1, tasks_per_node=1, gpus_per_node=min(cfg.gpus_per_node, 1),
                              job_name=f"{cfg.job_name}-eval",
                              sbatch_extra={**cfg.sbatch_extra, "dependency": f"after:{training_job or 'TRAINING_JOB'}"})
    executor = make_executor(one, run_dir / "eval" / "slurm", code_path)
    if cfg.dry_run:
        print("# the evaluation watcher, beside the training job: python -m distill.evaluate "
              + " ".join(watcher_argv(run_dir, evaluate)))
        print(sbatch_script(executor))
        return None
    job = executor.submit(job_entry, watcher_argv(run_dir, evaluate))
    return job.job_id
