"""Videos + captions -> parquet with tiny Wan VAE / umT5 models, then training on it."""

import json
import os
import subprocess
import sys

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, compose_config, read_metrics, write_tiny_pipeline_parts
from distill.config import validate
from distill.data.parquet import ParquetIndex, Shapes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_pipeline_parts(tmp_path_factory.mktemp("tiny-wan-pipeline"))


def write_video(path, frames, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = size[1], size[0]
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture
def videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    captions = []
    for i in range(5):
        write_video(folder / f"clip{i}.mp4", frames=6, seed=i)
        captions.append({"file_name": f"clip{i}.mp4", "caption": "a red square moves left" if i % 2 else "a blue square"})
    write_video(folder / "short.mp4", frames=2)
    (folder / "broken.mp4").write_bytes(b"\x00not a video at all" * 10)
    captions += [{"file_name": "short.mp4", "caption": "a square"}, {"file_name": "broken.mp4", "caption": "a square"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    return folder


def run_preprocess(model_dir, tmp_path, *extra, env=None):
    args = [sys.executable, "-m", "distill.preprocess", "--model", str(model_dir), "--captions",
            str(tmp_path / "captions.jsonl"), "--out", str(tmp_path / "data"), "--height", "32", "--width", "32",
            "--frames", "5", "--batch-size", "2", "--rows-per-shard", "2", "--max-text-len", "8", *extra]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, result.stderr
    return result


def test_preprocess_writes_a_dataset_skips_bad_videos_and_resumes(model_dir, videos, tmp_path):
    result = run_preprocess(model_dir, tmp_path, "--videos", str(videos))
    assert "written: 5" in result.stdout
    assert "skipped: too short: 1" in result.stdout and "skipped: unreadable: 1" in result.stdout
    assert "skipped short.mp4: too short (2 frames < 5)" in result.stderr
    shards = sorted((tmp_path / "data").glob("*.parquet"))
    assert len(shards) == 3 and not list((tmp_path / "data").glob(".*.tmp"))
    table = pq.read_table(shards[0]).to_pydict()
    assert table["vae_latent_shape"][0] == [16, 2, 4, 4] and table["text_embedding_shape"][0][1] == 32
    index = ParquetIndex(str(tmp_path / "data"), Shapes((16, 2, 4, 4), 8, 32))
    assert index.num_rows == 5
    again = run_preprocess(model_dir, tmp_path, "--videos", str(videos))
    assert "already_done: 5" in again.stdout and "written" not in again.stdout
    assert sorted((tmp_path / "data").glob("*.parquet")) == shards

    config = validate(compose_config([
        "data=parquet", f"data.path={tmp_path / 'data'}", "data.batch_size=2", "data.num_workers=0",
        "model.latent_shape=[16,2,4,4]", "method.rollout=data", "training.max_steps=3",
    ]))
    from distill.run import train

    train(config, tmp_path / "run")
    assert len(read_metrics(tmp_path / "run")) == 3


def test_ranks_split_the_work(model_dir, videos, tmp_path):
    for rank in (0, 1):
        run_preprocess(model_dir, tmp_path, "--videos", str(videos), env={"RANK": str(rank), "WORLD_SIZE": "2"})
    ids = [pq.read_table(p, columns=["id"]).column("id").to_pylist() for p in sorted((tmp_path / "data").glob("*.parquet"))]
    flat = sorted(i for shard in ids for i in shard)
    assert flat == [f"clip{i}.mp4" for i in range(5)]
    assert {p.name[:10] for p in (tmp_path / "data").glob("*.parquet")} == {"shard-r000", "shard-r001"}


def test_text_only_mode(model_dir, tmp_path):
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"file_name": f"p{i}", "caption": "a red square"}) for i in range(3)))
    run_preprocess(model_dir, tmp_path, "--text-only")
    table = pq.read_table(next((tmp_path / "data").glob("*.parquet"))).to_pydict()
    assert "vae_latent_bytes" not in table and table["text_embedding_shape"][0] == [3, 32]


def test_negative_prompt_is_encoded_and_used_for_guidance(model_dir, videos, tmp_path, caplog):
    """Preprocessing writes the negative prompt's embedding beside the shards (Wan's
    standard one by default); data=parquet uses it, and the teacher's guided x0
    differs from guidance against a zero embedding."""
    from safetensors import safe_open

    from distill.models.wan import WAN_NEGATIVE_PROMPT
    from distill.run import build_trainer

    run_preprocess(model_dir, tmp_path, "--videos", str(videos))
    file = tmp_path / "data" / "negative_embedding.safetensors"
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata()["prompt"] == WAN_NEGATIVE_PROMPT
        stored = f.get_tensor("text_embeds")
    assert stored.shape[1] == 32 and 1 <= stored.shape[0] <= 8
    overrides = ["data=parquet", f"data.path={tmp_path / 'data'}", "data.batch_size=2", "data.num_workers=0",
                 "model.latent_shape=[16,2,4,4]", "method.rollout=data", "logger.progress_bar=false"]
    trainer = build_trainer(validate(compose_config(overrides)), tmp_path / "run")
    batch = next(trainer.data)
    negative = batch["negative_text_embeds"]
    assert torch.equal(negative[0, : stored.shape[0]], stored) and not negative[0, stored.shape[0]:].any()
    adapter, teacher = trainer.method.adapter, trainer.roles["teacher"]
    x, sigma = torch.randn((2, 16, 2, 4, 4)), torch.tensor([0.6, 0.6])
    with torch.no_grad():
        guided = adapter.predict_x0_cfg(teacher, x, sigma, batch["text_embeds"], negative, 4.5)
        zeros = adapter.predict_x0_cfg(teacher, x, sigma, batch["text_embeds"], torch.zeros_like(negative), 4.5)
    assert not torch.allclose(guided, zeros, atol=1e-4)
    # an explicit data.negative_embedding wins; a dataset without one warns once and uses zeros
    file.rename(tmp_path / "elsewhere.safetensors")
    with caplog.at_level("WARNING"):
        explicit = build_trainer(validate(compose_config(
            [*overrides, f"data.negative_embedding={tmp_path / 'elsewhere.safetensors'}"])), tmp_path / "run2")
        assert torch.equal(next(explicit.data)["negative_text_embeds"], negative)
        assert "holds no negative_embedding.safetensors" not in caplog.text
        bare = build_trainer(validate(compose_config(overrides)), tmp_path / "run3")
    assert not next(bare.data)["negative_text_embeds"].any()
    assert caplog.text.count("holds no negative_embedding.safetensors") == 1
    assert "use a zero embedding" in caplog.text


def test_text_only_dataset_gets_the_given_negative_prompt(model_dir, tmp_path):
    from safetensors import safe_open

    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": "p0", "caption": "a red square"}))
    run_preprocess(model_dir, tmp_path, "--text-only", "--negative-prompt", "a blue square")
    with safe_open(str(tmp_path / "data" / "negative_embedding.safetensors"), framework="pt") as f:
        assert f.metadata()["prompt"] == "a blue square" and f.get_tensor("text_embeds").shape[1] == 32
