"""Compose, validate and run a distillation experiment.

    python launch.py                              # the embedded default, on a CPU
    python launch.py method=dmd2 model=wan        # the real Wan2.1 recipe
    python launch.py -m +sweep=digits_lr          # a sweep
    python launch.py hydra.run.dir=RUN            # continue RUN with its own config
    python launch.py --help                       # the groups and common commands

Exit codes: 0 done (or the run was already finished), 1 failed, 2 config
refused, 3 bad data, 4 bad checkpoint, 128 + N stopped by signal N (a
checkpoint was written; the message gives the command that resumes).
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from distill.cli_help import help_page
from distill.config import ConfigError, register_configs, validate
from distill.config.resume import (continue_argv, continued_config, existing_run, record_launch, run_dir_argument,
                                   saved_overrides)
from distill.config.sweeps import register_sweeps

ROOT = Path(__file__).resolve().parent
register_configs()
register_sweeps(ROOT / "sweeps")

ARGV = sys.argv[1:]  # as typed, before a continued run's saved overrides are added
CONTINUED = existing_run(ARGV)
EXPLICIT_DIR = run_dir_argument(ARGV)
EXPLICIT_DIR_EXISTED = EXPLICIT_DIR is not None and EXPLICIT_DIR.exists()
log = logging.getLogger("distill")


def remove_if_empty(run_dir: Path) -> None:
    """A refused config leaves no run folder: drop the folder Hydra made (and its
    empty parents, up to the working directory) when nothing is in it."""
    if EXPLICIT_DIR_EXISTED and run_dir.resolve() == EXPLICIT_DIR.resolve():
        return
    folder, cwd = run_dir.resolve(), Path.cwd().resolve()
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
        if cwd not in folder.parents:
            return


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """What Hydra would have written to .hydra/, once the config is accepted."""
    hydra_cfg = HydraConfig.get()
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), run_dir / ".hydra" / "hydra.yaml")
    record_launch(run_dir, list(hydra_cfg.overrides.task), ARGV)


def log_to_file(run_dir: Path) -> None:
    handler = logging.FileHandler(run_dir / "launch.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)


def accepted_config(cfg: DictConfig, run_dir: Path):
    """The validated config: this launch's, or for a continued run its saved one
    with the changes this launch may make."""
    if CONTINUED is None:
        return validate(cfg)
    from hydra import compose

    base = compose(config_name="config", overrides=saved_overrides(CONTINUED))
    config, changed = continued_config(CONTINUED, base, cfg)
    for key, value in changed.items():
        log.info("continuing %s with %s=%s", run_dir, key, value)
    return config


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = accepted_config(cfg, run_dir)
    except ConfigError as err:
        remove_if_empty(run_dir)
        print(f"config error:\n{err}", file=sys.stderr)
        sys.exit(2)
    if config.plan:
        remove_if_empty(run_dir)  # a plan writes nothing
        from distill.plan import report

        code, text = report(config)
        print(text, file=sys.stderr if code else sys.stdout)
        sys.exit(code)
    write_hydra_record(run_dir, cfg)
    log_to_file(run_dir)
    from distill.launcher import launch, outcome

    code, message = outcome(lambda: launch(config), run_dir)
    if message:
        print(message, file=sys.stderr if code else sys.stdout)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    if "--help" in ARGV or "-h" in ARGV:
        print(help_page(ROOT / "conf", ROOT / "sweeps"))
        sys.exit(0)
    if CONTINUED is not None:
        sys.argv = sys.argv[:1] + continue_argv(ARGV, CONTINUED)
    main()
    from distill.launcher import outcome, submit_pending_array

    code, message = outcome(submit_pending_array, None)  # a multirun with launcher=slurm: one job array
    if message:
        print(message, file=sys.stderr)
    sys.exit(code)
