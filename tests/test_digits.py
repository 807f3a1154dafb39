"""The moving-digits demo dataset."""

import pytest
import torch

from conftest import compose_config, read_metrics, run_launch
from distill.config import ConfigError, validate
from distill.data.digits import DIRECTIONS, SPEED, VERSION, cache_lock, digit_images, ensure_digits, make_clips, prompt
from distill.data.parquet import ParquetIndex, ParquetLatents, Shapes
from distill.data.schema import decode
from distill.data.hash_text import HashTextEncoder


def centroid(frame):
    w = (frame + 1).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    return float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())


def test_clips_are_deterministic_and_move_as_the_prompt_says():
    a, b = make_clips("train", 40, seed=5), make_clips("train", 40, seed=5)
    assert a == b
    assert make_clips("train", 40, seed=6) != a
    for row in a:
        clip = decode(row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"])
        assert clip.shape == (1, 4, 16, 16) and clip.min() >= -1 and clip.max() <= 1
        words = row["caption"].split()
        assert words[:2] == ["the", "digit"] and words[3] == "moving" and 0 <= int(words[2]) <= 9
        dy, dx = DIRECTIONS[words[4]]
        c0, c3 = centroid(clip[0, 0]), centroid(clip[0, 3])
        assert abs((c3[0] - c0[0]) - 3 * SPEED * dy) < 1e-4 and abs((c3[1] - c0[1]) - 3 * SPEED * dx) < 1e-4


def test_clips_with_several_speeds_move_by_one_of_them_unnamed():
    rows = make_clips("train", 200, seed=5, speeds=(1, 2))
    seen = []
    for row in rows:
        clip = decode(row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"])
        dy, dx = DIRECTIONS[row["caption"].split()[4]]
        c0, c1, c3 = centroid(clip[0, 0]), centroid(clip[0, 1]), centroid(clip[0, 3])
        speed = round((c1[0] - c0[0]) * dy + (c1[1] - c0[1]) * dx)
        assert speed in (1, 2) and "speed" not in row["caption"]
        assert abs((c3[0] - c0[0]) - 3 * speed * dy) < 1e-4 and abs((c3[1] - c0[1]) - 3 * speed * dx) < 1e-4
        seen.append(speed)
    assert 0.35 < seen.count(1) / len(seen) < 0.65, seen.count(1)
    assert make_clips("train", 40, seed=5, speeds=(SPEED,)) == make_clips("train", 40, seed=5)  # the default set


def test_speeds_have_their_own_cache_folder_and_bad_ones_are_refused(tmp_path):
    default, mixed = ensure_digits("val", str(tmp_path)), ensure_digits("val", str(tmp_path), speeds=[1, 2])
    assert default.parent.name == "digits-v1-seed0" and mixed.parent.name == "digits-v1-seed0-speeds1-2"
    for speeds in ("[3]", "[]", "[1,1]", "[0]"):
        with pytest.raises(ConfigError) as err:
            validate(compose_config(["data=digits", f"data.speeds={speeds}"]))
        assert "data.speeds=" in str(err.value) and "each 1 to 2 pixels per frame" in str(err.value)


def test_splits_use_different_handwriting():
    train, _ = digit_images("train")
    val, _ = digit_images("val")
    assert len(train) + len(val) == 1797
    assert not any(torch.equal(v, train[0]) for v in val)


def test_hash_text_encoder_is_fixed_per_word():
    enc = HashTextEncoder(32, 8)
    a, b = enc(prompt(3, "left")), enc(prompt(4, "left"))
    assert a.shape == (5, 32)
    assert torch.equal(a[[0, 1, 3, 4]], b[[0, 1, 3, 4]]) and not torch.equal(a[2], b[2])
    assert torch.equal(enc("The"), enc("the"))


def test_cached_dataset_is_built_once_and_reads(tmp_path):
    folder = ensure_digits("val", str(tmp_path))
    mtimes = [p.stat().st_mtime_ns for p in sorted(folder.glob("*.parquet"))]
    assert ensure_digits("val", str(tmp_path)) == folder
    assert [p.stat().st_mtime_ns for p in sorted(folder.glob("*.parquet"))] == mtimes
    shapes = Shapes((1, 4, 16, 16), 8, 32)
    ds = ParquetLatents(ParquetIndex(str(folder), shapes), shapes, batch_size=4, seed=0)
    assert ds.index.num_rows == 512
    assert ds.make_batch(0)["latents"].shape == (4, 1, 4, 16, 16)


def test_a_second_builder_waits_for_the_first_and_reads_its_split(tmp_path):
    """Two processes asking for an unbuilt split (two runs, two test workers): the one
    holding the cache's lock builds it, the other waits and then reads it; a split is
    there whole or not at all (built under another name, then renamed)."""
    import threading

    cache = tmp_path / f"digits-v{VERSION}-seed0"
    found = []
    with cache_lock(cache):  # another process is building
        reader = threading.Thread(target=lambda: found.append(ensure_digits("val", str(tmp_path))))
        reader.start()
        reader.join(timeout=2)
        assert reader.is_alive() and not (cache / "val").exists()
    reader.join(timeout=120)
    assert found == [cache / "val"]
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "val"]  # no half-built folder left
    assert len(list((cache / "val").glob("*.parquet"))) == 1


@pytest.mark.multiprocess
def test_two_process_run_on_digits(tmp_path):
    """On the shared default cache (the other tests' runs build it once, under its lock)."""
    run = tmp_path / "run"
    result = run_launch(
        ["model=digits", "data=digits", "data.batch_size=4",
         "launcher.nproc_per_node=2", "training.max_steps=2", f"hydra.run.dir={run}"]
    )
    assert result.returncode == 0, result.stderr
    assert len(read_metrics(run)) == 2
