"""Where a validated config runs. `local`: in this process."""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from distill.config.schema import Config


def launch(config: Config) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if config.launcher.name == "local":
        from distill.run import train

        train(config, run_dir)
    else:
        raise ValueError(f"launcher.name={config.launcher.name}: allowed values are local")
