"""Validation during training, for every model family.

A fixed set of prompts (the first `num_samples` rows of the validation data),
each with its own fixed noise seed, is sampled with
  - the student's sampler, as its method defines it (`Method.sampler`: the
    few-step schedule for DMD2, Euler with CFG for finetune);
  - once, as reference, the teacher: Euler with CFG at `teacher_steps` and at
    the student's step count.
Samples are decoded by the adapter (identity for digits, the Wan VAE for
Wan), saved under <run>/samples/ as PNG grids and GIFs, and scored when the
data has metrics (digits: conditional accuracy and Frechet distance). Every
validation also computes the run-health statistics of the student's and
(once) the teacher's samples, with the first prompt at several seeds for
their diversity (distill/validation/health.py); what the student looks like
against the teacher is in `findings` (static, flat, collapsed).
An image-conditioned model samples from the validation rows' first frames;
its grids show that image as each clip's first tile and its GIFs beside each
clip.
"""

import functools
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from distill.config.schema import Config
from distill.data import image_condition
from distill.registry import method_class
from distill.sampling import EulerSampler
from distill.validation.health import clip_statistics, findings
from distill.validation.media import save_gif, save_grid, save_mp4


class Validator:
    def __init__(self, config: Config, adapter, batch: Dict[str, torch.Tensor], run_dir: Path, is_main: bool,
                 metric: Optional[Callable] = None, labels: Optional[torch.Tensor] = None,
                 captions: Optional[List[str]] = None):
        self.config = config
        self.cfg = config.validation
        self.adapter = adapter
        self.batch = batch
        self.out = Path(run_dir) / "samples"
        self.is_main = is_main
        self.metric = metric
        self.labels = labels
        self.captions = captions  # each sample's prompt, drawn under its clip
        method = method_class(config.method.name)
        self.guidance = self.cfg.guidance_scale or method.guidance_scale(config.method)
        self.student_sampler = method.sampler(config.method, adapter, "student")
        self.teacher_done = False
        self.history: Dict[str, float] = {}  # the latest value of every metric, teacher's included
        self.student_history: List[Dict[str, float]] = []  # the student's metrics, one entry a validation
        self.teacher_health: Optional[Dict[str, float]] = None  # the reference statistics
        self.findings: List[str] = []  # of the last validation (rank 0)

    def _noise(self, device, seed: int) -> Callable:
        g = torch.Generator().manual_seed(seed)
        return lambda shape: torch.randn(shape, generator=g).to(device)

    @torch.no_grad()
    def sample_role(self, role, sampler, batch: Optional[Dict[str, torch.Tensor]] = None,
                    seed: Optional[int] = None) -> torch.Tensor:
        """The validation batch (or `batch`) sampled by `role` from the fixed noise seed."""
        device = next(role.module.parameters()).device
        batch = {k: v.to(device) for k, v in (self.batch if batch is None else batch).items()}
        cond = self.adapter.conditioning(batch)
        noise = self._noise(device, self.cfg.seed if seed is None else seed)
        return sampler(self.adapter, role, batch["text_embeds"], batch["negative_text_embeds"], noise, **cond)

    def first_prompt_at_seeds(self, role, sampler) -> Optional[torch.Tensor]:
        """The first prompt, `health.diversity_seeds` times from other noise: for the diversity figure."""
        k = self.cfg.health.diversity_seeds if self.cfg.health.enabled else 0
        if k < 2:
            return None
        repeated = {key: value[:1].repeat(k, *[1] * (value.dim() - 1)) for key, value in self.batch.items()}
        return self.sample_role(role, sampler, repeated, seed=self.cfg.seed + 1)

    def run(self, roles, step: int) -> Tuple[Dict[str, float], Dict[str, Path], Dict[str, Path]]:
        was_training = {n: r.module.training for n, r in roles.items()}
        for r in roles.values():
            r.module.eval()
        results, seeds = {}, {}
        student_steps = self.student_sampler.num_steps
        name = f"student_{student_steps}step"
        results[name] = self.sample_role(roles["student"], self.student_sampler)
        seeds[name] = self.first_prompt_at_seeds(roles["student"], self.student_sampler)
        if "teacher" in roles and not self.teacher_done:
            for n in dict.fromkeys((self.cfg.teacher_steps, student_steps)):
                teacher = EulerSampler(self.adapter.euler_sigmas(n), self.guidance)
                results[f"teacher_{n}step"] = self.sample_role(roles["teacher"], teacher)
                if n == self.cfg.teacher_steps:  # the reference the student's statistics are held against
                    seeds[f"teacher_{n}step"] = self.first_prompt_at_seeds(roles["teacher"], teacher)
            if "latents" in self.batch:
                results["real"] = self.batch["latents"]
            self.teacher_done = True
        for n, r in roles.items():
            r.module.train(was_training[n])
        if not self.is_main:
            return {}, {}, {}
        return self._report(results, step, seeds, name)

    def _report(self, results, step, seeds, student):
        self.out.mkdir(parents=True, exist_ok=True)
        metrics, images, videos = {}, {}, {}
        health = {}
        image = self.adapter.conditioning_image(self.adapter.conditioning(self.batch))
        image = None if image is None else self.adapter.decode(image)  # [N, C, 1, H, W] pixels
        for name, latents in results.items():
            pixels = self.adapter.decode(latents)
            stem = name if name.startswith(("teacher", "real")) else f"{name}-step{step:06d}"
            grid, clip = pixels, pixels
            if image is not None:
                grid = torch.cat([image, pixels], dim=2)  # the image as the first tile
                clip = torch.cat([image.expand(-1, -1, pixels.shape[2], -1, -1), pixels], dim=4)  # beside each frame
            images[f"samples/{name}"] = save_grid(grid, self.out / f"{stem}.png", self.captions)
            videos[f"videos/{name}"] = save_gif(clip, self.out / f"{stem}.gif", self.captions, fps=self.cfg.fps)
            sound = self.adapter.decode_audio(latents[:1])
            if sound is not None:  # the first sample with its sound, at the video's own frame rate
                videos[f"videos/{name}_sound"] = save_mp4(clip[:1], self.out / f"{stem}-sound.mp4", self.captions[:1],
                                                          fps=sound.fps, per_row=1, limit=1,
                                                          sound=(sound.waveforms[0], sound.rate))
            if self.metric is not None and self.cfg.metrics:
                for key, value in self.metric(pixels, self.labels).items():
                    metrics[f"val/{name}/{key}"] = value
            if self.cfg.health.enabled and name in seeds:
                at_seeds = seeds[name]
                health[name] = clip_statistics(pixels, None if at_seeds is None else self.adapter.decode(at_seeds))
                metrics.update({f"val/{name}/{key}": value for key, value in health[name].items()})
        if f"teacher_{self.cfg.teacher_steps}step" in health:
            self.teacher_health = health[f"teacher_{self.cfg.teacher_steps}step"]
        self.findings = findings(health[student], self.teacher_health, self.cfg.health) \
            if student in health and self.teacher_health else []
        self.history.update({k: v for k, v in metrics.items() if k.startswith("val/")})  # the quality table's
        self.student_history.append({k.split("/")[2]: v for k, v in metrics.items() if k.startswith(f"val/{student}/")})
        return metrics, images, videos

    def recent_student_mean(self, count: int = 2) -> Dict[str, float]:
        """The student's metrics averaged over its last `count` validations (validation swings
        by points of FD from one to the next); empty before `count` validations."""
        recent = self.student_history[-count:]
        if len(recent) < count:
            return {}
        return {k: sum(r[k] for r in recent) / count for k in recent[-1] if all(k in r for r in recent)}


def build_validator(config: Config, adapter, run_dir: Path, runtime) -> Validator:
    """The fixed validation batch: the first rows of the val split (digits), of
    the dataset (parquet), or a synthetic batch; digits also get their metric."""
    import dataclasses

    from distill.data import build_data

    n = config.validation.num_samples
    # one sample per batch, so a dataset smaller than num_samples repeats rows
    data = dataclasses.replace(config.data, batch_size=1, num_workers=0,
                               split="val" if config.data.name.value == "digits" else config.data.split)
    loader = build_data(dataclasses.replace(config, data=data, seed=config.validation.seed), 0, 1)
    samples = [next(loader) for _ in range(n)]
    batch = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
    metric, labels, captions = None, None, None
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "captions"):  # parquet data (digits included); synthetic data has no prompts
        captions = dataset.captions([row for b in range(n) for _, row in dataset.rows_of_batch(b)])
    if config.data.name.value == "digits" and config.validation.metrics:
        from distill.validation.digit_metrics import DigitMetrics

        labels = torch.tensor([int(c.split()[2]) for c in captions])
        metric = DigitMetrics(config.data.path) if runtime.is_main else None  # one classifier for every run
        if metric is not None:  # the diversity over the clips each prompt has
            metric = functools.partial(metric, prompts=captions)
        if metric is not None and image_condition(config.model) != "none":
            # the first frame is given: frames 2-4 are scored, each alone, and how they move
            metric = functools.partial(metric, directions=[c.split()[4] for c in captions], first=1,
                                       speeds=list(config.data.speeds), per_frame=True)
    return Validator(config, adapter, batch, run_dir, runtime.is_main, metric, labels, captions)
