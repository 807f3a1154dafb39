"""The teacher's ODE pairs for method=ode_init, from the same config it trains with.

    python -m distill.ode_pairs OUT [--batch-size 16] experiment=... data.path=PROMPTS [overrides]
    torchrun --nproc-per-node 8 -m distill.ode_pairs OUT ...    # each rank takes every 8th prompt

For every row of the prompt dataset (data=parquet, or data=digits; only the
text embeddings are read) the teacher (method.teacher_path, else model.path) runs the
flow ODE by Euler steps with classifier-free guidance
(method.guidance_scale, the dataset's negative embedding) from noise seeded
by (seed, row id). The Euler grid is the teacher's own sampling schedule:
method.teacher_steps evenly spaced sigmas passed through the model's shift,
then 0 (as CausVid's and Self-Forcing's pairs are made). The state stored for
each listed student sigma is the grid's state nearest it (CausVid's 50-step
grid at shift 8 keeps its points 36 and 44, sigma 0.7568 and 0.5217, for the
student's 757 and 522); a grid too coarse to give each listed sigma its own
point is refused. Each output row holds the prompt's columns,
`ode_trajectory` [S + 1, C, T, H, W] (the states for the S listed sigmas,
then the clean end, in model space) and `ode_sigmas`, the listed sigmas the
student is trained at.

Ids already in OUT are skipped, so a rerun finishes an interrupted job;
shards are written under a temporary name and renamed.
"""

import hashlib
import logging
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import pyarrow.parquet as pq
import torch

from distill.data.schema import TEXT, decode, make_row
from distill.data.writer import RankShards
from distill.distributed import rank_env
from distill.preprocess import done_ids  # ids already written: the same resume rule as preprocessing

log = logging.getLogger("distill.ode_pairs")
ROOT = Path(__file__).resolve().parents[1]


def row_seed(seed: int, sample_id: str) -> int:
    """A 63-bit seed from the run seed and a row id: the same noise on any rank and any rerun."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def teacher_grid(adapter, steps: int) -> torch.Tensor:
    """The teacher's Euler grid: its `steps`-step shifted schedule, ending at 0."""
    return torch.tensor([*adapter.euler_sigmas(steps), 0.0])


def stored_points(grid: torch.Tensor, listed: torch.Tensor) -> List[int]:
    """The index of the grid point nearest each listed sigma; ConfigError where two
    listed sigmas would share one (the grid is too coarse for them)."""
    from distill.config import ConfigError

    points = [int((grid[:-1] - sigma).abs().argmin()) for sigma in listed.tolist()]
    if len(set(points)) < len(points):
        near = ", ".join(f"{s:.4f} -> {float(grid[p]):.4f}" for s, p in zip(listed.tolist(), points))
        raise ConfigError(f"method.teacher_steps={len(grid) - 1}: the teacher's grid gives two listed sigmas one "
                         f"point ({near}); raise method.teacher_steps")
    return points


@torch.no_grad()
def trajectory(adapter, teacher, noise: torch.Tensor, text, uncond, grid: torch.Tensor, points: List[int],
               scale: float) -> torch.Tensor:
    """[B, S + 1, C, T, H, W]: the guided Euler states at the grid's `points`, then the clean end."""
    from distill.sampling import guided_euler

    states, x, at = [], noise, 0
    for end in [*points, len(grid) - 1]:
        x = guided_euler(adapter, teacher, x, grid[at:end + 1].to(x.device), text, uncond, scale)
        states.append(x)
        at = end
    return torch.stack(states, dim=1).float()


def prompts(folder: Path):
    """(id, caption, text embedding) of every row of a dataset, in shard order."""
    for shard in sorted(folder.glob("*.parquet")):
        cols = ["id", "caption", f"{TEXT}_bytes", f"{TEXT}_shape", f"{TEXT}_dtype"]
        table = pq.read_table(shard, columns=cols).to_pydict()
        for i, sample_id in enumerate(table["id"]):
            text = decode(table[f"{TEXT}_bytes"][i], table[f"{TEXT}_shape"][i], table[f"{TEXT}_dtype"][i])
            yield sample_id, table["caption"][i], text.float()


def prompt_folder(data, seed: int) -> Path:
    """The parquet folder holding the prompts: data.path, or the digits set's (built on first use)."""
    if data.name == "digits":
        from distill.data.digits import ensure_digits

        return Path(ensure_digits(data.split, data.path, seed, data.speeds, data.frames))
    return Path(data.path)


def make_pairs(config, out: Path, batch_size: int = 4, rows_per_shard: int = 256) -> int:
    """Write this rank's share of the ODE pairs; returns the rows written."""
    from distill.config.schema import RoleConfig
    from distill.data import NEGATIVE_FILE, _negative, negative_embedding_file
    from distill.data.parquet import Shapes
    from distill.methods.dmd2 import student_sigmas
    from distill.models import build_adapter
    from distill.parallel import DTYPES
    from distill.roles import Role

    rank, world, _ = rank_env()
    model, method = config.model, config.method
    adapter = build_adapter(model)
    listed = student_sigmas(method, adapter)
    grid = teacher_grid(adapter, method.teacher_steps)
    points = stored_points(grid, listed)  # before anything is loaded or written
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = Shapes(None, model.text_len, model.text_dim)
    negative_file = negative_embedding_file(config.data)
    uncond = _negative(negative_file, shapes)
    uncond = torch.zeros(model.text_len, model.text_dim) if uncond is None else uncond
    if rank == 0 and negative_file and not (out / NEGATIVE_FILE).exists():
        shutil.copyfile(negative_file, out / NEGATIVE_FILE)
    teacher_cfg = RoleConfig(precision=config.roles["student"].precision)  # computes at the student's precision
    network = adapter.load(method.teacher_path or model.path, config.seed, DTYPES[teacher_cfg.precision])
    teacher = Role("teacher", teacher_cfg, network.to(device).eval().requires_grad_(False))
    log.info("teacher grid of %d steps; states stored at its points %s (sigmas %s) for the listed %s",
             method.teacher_steps, points, [round(float(grid[p]), 4) for p in points],
             [round(s, 4) for s in listed.tolist()])
    done = done_ids(out)
    mine = [row for i, row in enumerate(prompts(prompt_folder(config.data, config.seed)))
            if i % world == rank and row[0] not in done]
    shards, written = RankShards(out, rank, rows_per_shard), 0
    for start in range(0, len(mine), batch_size):
        rows = mine[start:start + batch_size]
        texts = torch.zeros(len(rows), model.text_len, model.text_dim)
        for i, (_, _, text) in enumerate(rows):
            texts[i, : min(len(text), model.text_len)] = text[: model.text_len]
        noise = torch.stack([torch.randn(adapter.latent_shape, generator=torch.Generator().manual_seed(
            row_seed(config.seed, sample_id))) for sample_id, _, _ in rows])
        states = trajectory(adapter, teacher, noise.to(device), texts.to(device),
                            uncond.expand(len(rows), -1, -1).to(device), grid, points, method.guidance_scale).cpu()
        for (sample_id, caption, text), trajectory_states in zip(rows, states):
            shards.add(make_row(sample_id, text, caption, ode=trajectory_states, ode_sigmas=listed.tolist()))
        written += len(rows)
        log.info("rank %d: %d of %d prompts", rank, written, len(mine))
    shards.close()
    return written


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    batch_size = 16
    if len(argv) > 2 and argv[1] == "--batch-size":
        batch_size, argv = int(argv[2]), [argv[0], *argv[3:]]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hydra import compose, initialize_config_dir

    from distill.config import ConfigError, register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=argv[1:])
    try:
        config = validate(cfg)
    except ConfigError as err:
        print(f"config error:\n{err}", file=sys.stderr)
        return 2
    if config.method.name != "ode_init":
        print(f"config error:\nmethod.name={config.method.name}: ODE pairs are made for method=ode_init",
              file=sys.stderr)
        return 2
    try:
        written = make_pairs(config, Path(argv[0]), batch_size=batch_size)
    except ConfigError as err:  # raised before the teacher is loaded
        print(f"config error:\n{err}", file=sys.stderr)
        return 2
    print(f"{written} ODE pairs written to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
