"""Where metrics go: metrics.jsonl and launch.log always, wandb unless
logger=none, a progress bar on the console, and loss_curves.png at the end.
Only rank 0 tracks; the others get a Tracker that does nothing.

A training log line holds the mean of each metric over the iterations since
the previous line (the peak memory: its maximum), so a role that steps every
k-th iteration still appears on every line."""

import json
import logging
import math
import os
import resource
import secrets
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

log = logging.getLogger("distill")

WANDB_ID_FILE = "wandb_id.txt"


class Tracker:
    def __init__(self, run_dir: Path, config=None, total_steps: int = 0, start_step: int = 0,
                 enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.wandb = None
        self.bar = None
        self._redirect = None
        if not enabled:
            return
        self.file = open(self.run_dir / "metrics.jsonl", "a")
        logger = getattr(config, "logger", None)
        if logger is not None and logger.name.value == "wandb":
            self.wandb = start_wandb(self.run_dir, config)
        if logger is not None and logger.progress_bar and total_steps:
            from tqdm import tqdm

            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="it", dynamic_ncols=True)
            # log lines go through tqdm.write: printed above the bar, never glued to it
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()

    def log(self, step: int, metrics: Dict[str, float], force: bool = False) -> None:
        """A log line: the trainer's window means at a log step, or, forced, a
        record written as it is (validation)."""
        if not self.enabled:
            return
        if not force and self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                                  if k.startswith("loss/")}, refresh=False)
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        log.info("step %d %s", step, " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def progress(self, step: int) -> None:
        """The bar at `step` (every iteration; reads nothing from the device)."""
        if self.enabled and self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log_media(self, step: int, images: Dict[str, Path], videos: Dict[str, Path]) -> None:
        if self.wandb is None:
            return
        import wandb

        media = {k: wandb.Image(str(p)) for k, p in images.items()}
        media.update({k: wandb.Video(str(p), format=Path(p).suffix[1:]) for k, p in videos.items()})  # gif, mp4
        self.wandb.log(media, step=step)

    def alert(self, title: str, text: str) -> None:
        """A wandb alert (e-mail, Slack) where the run is online; the log line is the caller's."""
        if self.wandb is not None and not self.wandb.offline:
            self.wandb.alert(title=title, text=text, level="WARN")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
        self.file.close()
        plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curves.png")
        if self.wandb is not None:
            self.wandb.finish()


class MetricWindow:
    """Running sums of the metrics since the last log line; peak memory keeps its maximum.

    Tensor values (losses, norms, sigmas) are summed where they are, on the
    device: reading them on the host would wait for the GPU every iteration.
    `flush` reads them all at once, after `reduce` (the mean over ranks)."""

    MAX_KEYS = ("peak_memory_gb",)

    def __init__(self):
        self.sums: Dict[str, object] = {}
        self.counts: Dict[str, int] = {}

    def add(self, metrics: Dict[str, object]) -> None:
        for key, value in metrics.items():
            if torch.is_tensor(value):
                value = value.detach().double()
            if key in self.MAX_KEYS:
                self.sums[key] = max(self.sums.get(key, value), value)
                self.counts[key] = 1
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
        """The window's means (in first-seen key order), and a fresh window. The
        tensor sums are read in one transfer, through `reduce` when given."""
        on_device = sorted(k for k, v in self.sums.items() if torch.is_tensor(v))  # alike on every rank
        if on_device:
            device = self.sums[on_device[0]].device  # a metric computed on the host joins the device ones
            stacked = torch.stack([self.sums[k].reshape(()).to(device) for k in on_device])
            values = (reduce(stacked) if reduce else stacked).cpu().tolist()  # the window's one host sync
            self.sums.update(zip(on_device, values))
        means = {key: self.sums[key] / self.counts[key] for key in self.sums}
        self.sums, self.counts = {}, {}
        return means


def set_aside_records_after(metrics_file: Path, step: int) -> int:
    """A run resuming from `step` redoes the steps after it: their records (from a
    trajectory that no checkpoint kept) move to metrics.discarded.jsonl, so that
    metrics.jsonl holds each step once. Returns how many moved."""
    if not metrics_file.is_file():
        return 0
    lines = [line for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [json.loads(line)["step"] for line in lines]
    later = [line for line, s in zip(lines, steps) if s > step]
    if later:
        with open(metrics_file.with_name("metrics.discarded.jsonl"), "a") as f:
            f.write("\n".join(later) + "\n")
        metrics_file.write_text("".join(line + "\n" for line, s in zip(lines, steps) if s <= step))
    return len(later)


def start_wandb(run_dir: Path, config):
    """A wandb run in <run>/wandb; a resumed or requeued run continues the same id."""
    import wandb
    from omegaconf import OmegaConf

    cfg = config.logger
    mode = cfg.mode.value
    if mode == "auto":
        mode = "online" if _logged_in() else "offline"
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        tags=list(cfg.tags),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        config=OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True),
        settings=wandb.Settings(silent=True, console="off"),
    )


def _logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def plot_losses(metrics_file: Path, out: Path) -> Optional[Path]:
    """loss/* against step, one panel per loss, for people without wandb."""
    if not metrics_file.is_file():
        return None
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    keys = sorted({k for r in records for k in r if k.startswith("loss/")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log" if all(v > 0 for _, v in points) else "linear")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt(value) -> str:
    if isinstance(value, float) and math.isfinite(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
