"""Compose, validate and run a distillation experiment.

    python launch.py                              # the embedded default, on a CPU
    python launch.py method=dmd2 model=wan        # the real Wan2.1 recipe
    python launch.py -m +sweep=dmd2_lr_ratio      # a sweep
    python launch.py --cfg job                    # print the composed config
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from distill.config import ConfigError, register_configs, validate
from distill.config.sweeps import register_sweeps

register_configs()
register_sweeps(Path(__file__).resolve().parent / "sweeps")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        config = validate(cfg)
    except ConfigError as err:
        print(f"config error:\n{err}", file=sys.stderr)
        sys.exit(2)
    from distill.launcher import LaunchError, launch

    try:
        launch(config)
    except LaunchError as err:
        print(f"run failed: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
    from distill.launcher import LaunchError, submit_pending_array

    try:
        submit_pending_array()  # a multirun with launcher=slurm: one job array
    except LaunchError as err:
        print(f"run failed: {err}", file=sys.stderr)
        sys.exit(1)
