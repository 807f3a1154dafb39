"""Parquet datasets: round trip, FastVideo layout, sharding, resumption, checks."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import compose_config, read_metrics
from distill.config import validate
from distill.data import build_data
from distill.data.parquet import DataError, ParquetIndex, ParquetLatents, Shapes, StatefulLoader
from distill.data.schema import make_row
from distill.data.writer import write_dataset, write_shard

SHAPES = Shapes(latent=(4, 2, 3, 3), text_len=6, text_dim=5)


def rows(n, dtype=torch.float32, start=0, text_tokens=3, latent_shape=(4, 2, 3, 3)):
    g = torch.Generator().manual_seed(start)
    return [
        make_row(
            f"clip-{start + i}",
            torch.randn(text_tokens, 5, generator=g).to(dtype),
            f"caption {start + i}",
            torch.randn(*latent_shape, generator=g).to(dtype),
        )
        for i in range(n)
    ]


def dataset(folder, shapes=SHAPES, batch_size=2, rank=0, world_size=1, **kw):
    return ParquetLatents(ParquetIndex(str(folder), shapes), shapes, batch_size, seed=3, rank=rank, world_size=world_size, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    written = rows(10, dtype)
    write_dataset(written, tmp_path, rows_per_shard=4, row_group_size=3)
    assert len(list(tmp_path.glob("*.parquet"))) == 3
    ds = dataset(tmp_path)
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        text = torch.randn(3, 5, generator=g).to(dtype)
        latent = torch.randn(4, 2, 3, 3, generator=g).to(dtype)
        sample = ds.read_row(i)
        assert torch.equal(sample["text"], text.float()) and torch.equal(sample["latent"], latent.float())


def test_fastvideo_layout_reads_unchanged(tmp_path):
    """A shard written with pyarrow alone, in FastVideo's columns and byte layout."""
    latent = np.arange(4 * 2 * 3 * 3, dtype=np.float32).reshape(4, 2, 3, 3)
    text = np.ones((2, 5), dtype=np.float32) * 0.5
    table = pa.table(
        {
            "id": ["v0"],
            "vae_latent_bytes": [latent.tobytes()],
            "vae_latent_shape": [list(latent.shape)],
            "vae_latent_dtype": ["float32"],
            "text_embedding_bytes": [text.tobytes()],
            "text_embedding_shape": [list(text.shape)],
            "text_embedding_dtype": ["float32"],
            "file_name": ["v0.mp4"],
            "caption": ["a caption"],
            "media_type": ["video"],
            "width": [24],
            "height": [24],
            "num_frames": [5],
            "duration_sec": [0.2],
            "fps": [25.0],
        }
    )
    pq.write_table(table, tmp_path / "data_chunk_0.parquet")
    mean, std = torch.full((4,), 1.0), torch.full((4,), 2.0)
    ds = dataset(tmp_path, batch_size=1, latents_mean=mean, latents_std=std)
    batch = ds.make_batch(0)
    assert torch.equal(batch["latents"][0], (torch.from_numpy(latent) - 1.0) / 2.0)
    assert torch.equal(batch["text_embeds"][0, :2], torch.from_numpy(text))
    assert torch.equal(batch["text_embeds"][0, 2:], torch.zeros(4, 5))  # padded to text_len
    assert batch["text_mask"][0].tolist() == [True, True, False, False, False, False]
    assert torch.equal(batch["negative_text_embeds"], torch.zeros(1, 6, 5))


def test_text_only_dataset(tmp_path):
    g = torch.Generator().manual_seed(0)
    write_shard([make_row(f"t{i}", torch.randn(2, 5, generator=g), "c") for i in range(4)], tmp_path / "a.parquet")
    shapes = Shapes(None, 6, 5)
    batch = dataset(tmp_path, shapes=shapes).make_batch(0)
    assert "latents" not in batch and batch["text_embeds"].shape == (2, 6, 5)


def test_two_ranks_disjoint_cover_and_epochs_reshuffle(tmp_path):
    write_dataset(rows(12), tmp_path, rows_per_shard=4, row_group_size=2)  # 6 row groups of 2
    per_rank = [dataset(tmp_path, batch_size=2, rank=r, world_size=2, shuffle_window=2) for r in range(2)]
    epoch0 = [set(ds.rows_of_epoch(0).tolist()) for ds in per_rank]
    assert not epoch0[0] & epoch0[1] and epoch0[0] | epoch0[1] == set(range(12))
    assert per_rank[0].rows_of_epoch(0).tolist() != per_rank[0].rows_of_epoch(1).tolist()
    assert {len(ds.rows_of_epoch(0)) for ds in per_rank} == {6}
    # 6 rows per rank: batch 3 of rank 0 is the first batch of epoch 1
    assert [e for e, _ in per_rank[0].rows_of_batch(3)] == [1, 1]


def test_uneven_row_groups_give_equal_shares(tmp_path):
    write_dataset(rows(11), tmp_path, rows_per_shard=5, row_group_size=2)  # groups 2,2,1,2,2,1,1
    per_rank = [dataset(tmp_path, batch_size=1, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        shares = [ds.rows_of_epoch(epoch).tolist() for ds in per_rank]
        assert len(shares[0]) == len(shares[1]) and not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_exactly_mid_epoch(tmp_path, num_workers):
    write_dataset(rows(10), tmp_path, rows_per_shard=4, row_group_size=2)
    straight = StatefulLoader(dataset(tmp_path, batch_size=3), num_workers=num_workers)
    batches = [next(straight) for _ in range(7)]  # 3 rows x 7 crosses two epoch ends
    first = StatefulLoader(dataset(tmp_path, batch_size=3), num_workers=num_workers)
    for _ in range(2):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = StatefulLoader(dataset(tmp_path, batch_size=3), num_workers=num_workers)
    resumed.load_state_dict(state)
    for want in batches[2:]:
        got = next(resumed)
        assert all(torch.equal(want[k], got[k]) for k in want)


def _expect(folder, message, shapes=SHAPES):
    with pytest.raises(DataError) as err:
        ParquetIndex(str(folder), shapes)
    assert message in str(err.value), str(err.value)


def test_bad_inputs_are_named(tmp_path):
    _expect(tmp_path / "nope", f"data.path={tmp_path / 'nope'}: no such folder")
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "no parquet shards")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    _expect(tmp_path / "other", "no parquet shards")

    cols = tmp_path / "cols"
    cols.mkdir()
    pq.write_table(pa.table({"id": ["a"], "caption": ["c"]}), cols / "s.parquet")
    _expect(cols, f"{cols / 's.parquet'}: missing columns ['text_embedding_bytes'")

    corrupt = tmp_path / "corrupt"
    write_dataset(rows(3), corrupt)
    (corrupt / "shard-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    _expect(corrupt, f"{corrupt / 'shard-00000.parquet'}: corrupt parquet shard")

    channels = tmp_path / "channels"
    write_dataset(rows(3), channels)
    _expect(channels, "row 0 (id clip-0): latent shape [4, 2, 3, 3] does not fit the model's 16 channels",
            Shapes((16, 2, 3, 3), 6, 5))
    _expect(channels, "latent shape [4, 2, 3, 3] differs from model.latent_shape=[4, 5, 3, 3]", Shapes((4, 5, 3, 3), 6, 5))
    _expect(channels, "text embedding shape [3, 5] does not fit model.text_dim=7", Shapes((4, 2, 3, 3), 6, 7))
    _expect(channels, "text embedding of 3 tokens exceeds model.text_len=2", Shapes((4, 2, 3, 3), 2, 5))


def test_nan_in_a_batch_names_the_row(tmp_path):
    bad = rows(4)
    bad[2] = make_row("clip-bad", torch.ones(3, 5), "c", torch.full((4, 2, 3, 3), float("nan")))
    write_dataset(bad, tmp_path, row_group_size=2)
    ds = dataset(tmp_path, batch_size=4)
    with pytest.raises(DataError) as err:
        ds.make_batch(0)
    assert f"{tmp_path / 'shard-00000.parquet'} row 2 (id clip-bad): latent holds NaN or inf" in str(err.value)


def test_negative_embedding_file_is_padded_and_checked(tmp_path):
    from safetensors.torch import save_file

    write_dataset(rows(4), tmp_path / "data")
    save_file({"text_embeds": torch.ones(2, 5)}, str(tmp_path / "neg.safetensors"))
    config = validate(
        compose_config(
            [
                "data=parquet",
                f"data.path={tmp_path / 'data'}",
                "model.latent_shape=[4,2,3,3]",
                "model.text_len=6",
                "model.text_dim=5",
                "model.arch.in_channels=4",
                "model.arch.out_channels=4",
                "model.arch.text_dim=5",
                f"data.negative_embedding={tmp_path / 'neg.safetensors'}",
                "data.num_workers=0",
            ]
        )
    )
    batch = next(build_data(config))
    assert torch.equal(batch["negative_text_embeds"][0, :2], torch.ones(2, 5))
    assert torch.equal(batch["negative_text_embeds"][0, 2:], torch.zeros(4, 5))


def test_parquet_run_trains_and_bad_data_stops_before_models(tmp_path):
    from distill.run import train

    write_dataset(rows(8, latent_shape=(4, 2, 4, 4)), tmp_path / "data")
    common = ["data=parquet", "model.latent_shape=[4,2,4,4]", "model.text_len=6", "model.text_dim=5",
              "model.arch.in_channels=4", "model.arch.out_channels=4", "model.arch.text_dim=5",
              "training.max_steps=3", "method.rollout=data", "data.num_workers=0"]
    train(validate(compose_config([*common, f"data.path={tmp_path / 'data'}"])), tmp_path / "run")
    assert len(read_metrics(tmp_path / "run")) == 3
    (tmp_path / "bad").mkdir()
    with pytest.raises(DataError, match="no parquet shards"):
        train(validate(compose_config([*common, f"data.path={tmp_path / 'bad'}"])), tmp_path / "run2")


def i2v_rows(n, clip=(5, 7), first_frames=2):
    """FastVideo i2v rows: the image latent (then black frames), CLIP features, first-frame pixels."""
    from distill.data.schema import CLIP, FIRST_FRAME, IMAGE

    g = torch.Generator().manual_seed(9)
    out = rows(n)
    for row in out:
        image = {CLIP: torch.randn(*clip, generator=g) if clip else None,
                 FIRST_FRAME: torch.randn(4, first_frames, 3, 3, generator=g),
                 IMAGE: torch.randint(0, 255, (3, 3, 3), dtype=torch.uint8)}
        row.update(make_row(row["id"], torch.zeros(3, 5), row["caption"], i2v=image))
        row["vae_latent_bytes"] = row.pop("vae_latent_bytes")
    return out


def test_image_columns_are_read_normalised_and_checked(tmp_path):
    """first_frame: the image latent's first frame (or the clip's); concat: the whole image
    latent and the CLIP features; a missing column or a wrong shape is named."""
    from distill.data.schema import FIRST_FRAME, decode

    folder = tmp_path / "i2v"
    written = i2v_rows(2)
    write_dataset(written, folder)
    mean, std = torch.arange(4.0), torch.full((4,), 2.0)
    stats = dict(latents_mean=mean, latents_std=std)

    def image_latent(row):
        return (decode(row[f"{FIRST_FRAME}_bytes"], [4, 2, 3, 3], "float32") - mean.reshape(-1, 1, 1, 1)) / 2

    concat = dataset(folder, Shapes((4, 2, 3, 3), 6, 5, image_condition="concat", image_latent=(4, 2, 3, 3)), **stats)
    batch = concat.make_batch(0)
    order = [int(i) for i in batch["sample_id"]]
    assert torch.allclose(batch["image_latent"], torch.stack([image_latent(written[i]) for i in order]))
    assert batch["image_embeds"].shape == (2, 5, 7)
    first = dataset(folder, Shapes((4, 2, 3, 3), 6, 5, image_condition="first_frame", image_latent=(4, 2, 3, 3)), **stats)
    assert torch.allclose(first.make_batch(0)["first_frame"], batch["image_latent"][:, :, :1])

    plain = tmp_path / "plain"  # no image columns: first_frame takes the clip's first latent frame
    write_dataset(rows(2), plain)
    b = dataset(plain, Shapes((4, 2, 3, 3), 6, 5, image_condition="first_frame", image_latent=(4, 2, 3, 3))).make_batch(0)
    assert torch.equal(b["first_frame"], b["latents"][:, :, :1])
    _expect(plain, "missing columns ['first_frame_latent_bytes', 'first_frame_latent_shape', 'first_frame_latent_dtype', "
            "'clip_feature_bytes'", Shapes((4, 2, 3, 3), 6, 5, image_condition="concat", image_latent=(4, 2, 3, 3)))
    _expect(plain, "python -m distill.preprocess --task i2v",
            Shapes(None, 6, 5, image_condition="first_frame", image_latent=(4, 2, 3, 3)))
    no_clip = tmp_path / "no_clip"
    write_dataset(i2v_rows(2, clip=None), no_clip)
    _expect(no_clip, "row 0 (id clip-0): clip_feature shape [] is not [tokens, dim]",
            Shapes((4, 2, 3, 3), 6, 5, image_condition="concat", image_latent=(4, 2, 3, 3)))
    short = tmp_path / "short"
    write_dataset(i2v_rows(2, first_frames=1), short)
    _expect(short, "first_frame_latent shape [4, 1, 3, 3] differs from model.latent_shape=[4, 2, 3, 3]",
            Shapes((4, 2, 3, 3), 6, 5, image_condition="concat", image_latent=(4, 2, 3, 3)))
