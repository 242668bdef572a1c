"""codec/data/index.py: random access to the records of tars and parquet files, local and in a bucket, and the codec
trainer on them (the same weights from a folder of tars and from a bucket, resumed or not)."""

from __future__ import annotations

import io
import pickle
import tarfile

import pytest
import yaml
from PIL import Image

import codec.data.index as index_module
import codec.training.train as train_module
from codec.data import BUNDLED_TRAIN, InputSource, TrainCrops, decode_image, load_image_dataset
from codec.data.index import RecordIndex
from codec.training.train import train_codec
from tests.codec.data.helpers import COLOURS
from tests.codec.data.test_inputs import (
    everything,
    img2dataset_members,
    upload,
    without_source,
    write_img2dataset_parquet,
    write_tar,
)
from tests.conftest import assert_same_safetensors, killed_after_a_checkpoint, reset_accelerate


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    """Each test indexes into its own cache folder."""
    folder = tmp_path / "index-cache"
    monkeypatch.setenv(index_module.CACHE_VARIABLE, str(folder))
    return folder


@pytest.fixture
def awkward_shards(tmp_path):
    """img2dataset tars with what a crawl leaves behind: a sample without its .txt, one without an image, one whose
    image is not an image, and a tar truncated inside its third sample."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "00000.tar", img2dataset_members(0, 5, no_txt={1}, no_image={2}, garbage={3}))
    write_tar(folder / "00001.tar", img2dataset_members(1, 3))
    whole = (folder / "00001.tar").read_bytes()
    cut = next(m.offset for m in tarfile.open(folder / "00001.tar") if m.name.endswith("2.txt"))
    (folder / "00001.tar").write_bytes(whole[:cut + 300])
    write_tar(folder / "00002.tar", img2dataset_members(2, 2))
    return folder


def counted_scans(monkeypatch) -> list:
    """The tars whose headers are read from now on."""
    scanned = []
    real = index_module.tar_members

    def counting(fh):
        scanned.append(getattr(fh, "name", fh))
        return real(fh)

    monkeypatch.setattr(index_module, "tar_members", counting)
    return scanned


def test_the_index_gives_input_sources_records_in_order_rejects_included(awkward_shards):
    index = RecordIndex(awkward_shards)
    records = everything(InputSource(awkward_shards))
    assert len(index) == len(records) == 5 + 3 + 2  # the truncated tar: 2 samples and one reject naming it
    assert list(index) == records
    assert index[1]["caption"] is None and index[2]["reject"] == "no image member (members: json, txt)"
    assert index[7] == {"row": 2, "id": "00001.tar", "source": str(awkward_shards / "00001.tar"),
                        "reject": records[7]["reject"]}
    assert records[7]["reject"].startswith("truncated or corrupt tar after 2 samples")
    assert decode_image(index[4]["image"]).getpixel((4, 4)) == pytest.approx(COLOURS[4], abs=3)
    assert index[-1] == records[-1]
    with pytest.raises(IndexError):
        index[len(records)]

    copy = pickle.loads(pickle.dumps(index))  # as a DataLoader worker gets it
    assert [copy[i] for i in (9, 0, 4)] == [records[i] for i in (9, 0, 4)]
    chosen = index.select([9, 0, 4])
    assert list(chosen) == [records[i] for i in (9, 0, 4)] and len(chosen) == 3
    assert chosen.select([2])[0] == records[4]
    assert chosen["caption"] == [records[i].get("caption") for i in (9, 0, 4)]
    assert index["id"] == [r["id"] for r in records]


def test_captions_from_json_members_and_the_images_member_named(tmp_path):
    members = [m for m in img2dataset_members(0, 3) if not m[0].endswith(".txt")]
    write_tar(tmp_path / "00000.tar", members + [("000000002.png", b"a png member too")])
    assert list(RecordIndex(tmp_path / "00000.tar")) == everything(InputSource(tmp_path / "00000.tar"))
    assert RecordIndex(tmp_path / "00000.tar")["caption"] == ["photo 000000000", "photo 000000001", "photo 000000002"]
    named = RecordIndex(tmp_path / "00000.tar", image_column="png")
    assert list(named) == everything(InputSource(tmp_path / "00000.tar", image_column="png"))
    assert "reject" in named[0] and named[2]["image"]["bytes"] == b"a png member too"


def test_parquet_rows_by_row_group_and_their_columns(tmp_path, offline):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "parquet"
    folder.mkdir()
    write_img2dataset_parquet(folder / "part-0.parquet", 0, 3, missing_image={1})
    table = pq.read_table(folder / "part-0.parquet")
    pq.write_table(pa.concat_tables([table, table.slice(0, 2)]), folder / "part-0.parquet", row_group_size=2)
    write_img2dataset_parquet(folder / "part-1.parquet", 5, 2)
    index = RecordIndex(folder)
    assert [len(arrays["group_rows"]) for arrays in index._units] == [3, 1]
    assert list(index) == everything(InputSource(folder))
    assert index[6]["id"] == "part-1.parquet/000000006" and index[1]["reject"] == "no image in the row"
    assert [index[i]["id"] for i in (6, 0, 4, 3)] == ["part-1.parquet/000000006", "part-0.parquet/000000000",
                                                      "part-0.parquet/000000001", "part-0.parquet/000000000"]
    assert index["width"] == [8] * 7 and index.select([6, 0])["key"] == ["000000006", "000000000"]
    with pytest.raises(KeyError, match="'height' is not a column"):
        index["height"]


def test_a_second_index_reads_no_headers_and_a_changed_tar_is_scanned_again(awkward_shards, monkeypatch,
                                                                                index_cache):
    first = list(RecordIndex(awkward_shards))
    scanned = counted_scans(monkeypatch)
    assert list(RecordIndex(awkward_shards)) == first and scanned == []
    assert len(list(index_cache.glob("*.npz"))) == 3  # one file per tar

    write_tar(awkward_shards / "00002.tar", img2dataset_members(7, 3))  # rewritten in place: size and time change
    changed = RecordIndex(awkward_shards)
    assert scanned == [str(awkward_shards / "00002.tar")]
    assert list(changed) == everything(InputSource(awkward_shards))
    assert changed[-1]["id"] == "00002.tar/000070002" and len(changed) == len(first) + 1

    # A damaged cache file is scanned again, not trusted.
    for path in index_cache.glob("*.npz"):
        path.write_bytes(b"not a zip")
    assert list(RecordIndex(awkward_shards)) == list(changed) and len(scanned) == 1 + 3


def test_the_same_tars_and_parquet_in_a_bucket_give_the_same_records(awkward_shards, tmp_path, local_s3,
                                                                       monkeypatch, offline):
    url = upload(local_s3, awkward_shards, "laion/shards")
    local, remote = RecordIndex(awkward_shards), RecordIndex(url)
    assert without_source(list(remote)) == without_source(list(local))
    assert list(remote) == everything(InputSource(url))
    scanned = counted_scans(monkeypatch)
    again = pickle.loads(pickle.dumps(RecordIndex(url)))  # from the cache, keyed by ETag
    assert scanned == [] and [again[i] for i in (4, 0)] == [remote[4], remote[0]]

    write_img2dataset_parquet(tmp_path / "part-0.parquet", 0, 3)
    url = upload(local_s3, tmp_path, "parquet")
    remote = RecordIndex(f"{url}/part-0.parquet")
    assert without_source(list(remote)) == without_source(list(RecordIndex(tmp_path / "part-0.parquet")))


def test_load_image_dataset_gives_tars_and_parquet_as_an_index_that_train_crops_read(awkward_shards):
    dataset, column = load_image_dataset(f"{awkward_shards}/{{00000..00002}}.tar")
    assert isinstance(dataset, RecordIndex) and column == "image" and len(dataset) == 10
    crops = TrainCrops(dataset, column, crop_size=4, seed=0, flip=False)
    unreadable = {2, 3, 7}  # no image member, not an image, the truncated tar's reject
    for draw in range(2 * len(dataset)):
        wanted = crops.item_index(draw)
        crop = crops[draw]["pixels"]
        replacement = next(i % 10 for i in range(wanted, wanted + 10) if i % 10 not in unreadable)
        colour = [round((c + 1) * 127.5) for c in crop[:, 0, 0].tolist()]
        assert colour == pytest.approx(COLOURS[{0: 0, 1: 1, 4: 4, 5: 0, 6: 1, 8: 0, 9: 1}[replacement]], abs=4)
    assert set(crops.rejected) == unreadable


def test_load_image_dataset_lists_a_folder_of_tars_once(awkward_shards, monkeypatch):
    """The listing that found the tars is the index's: a bucket of many tars is listed once at start, not twice."""
    import codec.data.listing as listing_module

    listed, real = [], listing_module.list_folder

    def counting(where, *args, **kwargs):
        listed.append(where)
        return real(where, *args, **kwargs)

    monkeypatch.setattr(listing_module, "list_folder", counting)
    dataset, _ = load_image_dataset(str(awkward_shards))
    assert len(dataset) == 10 and listed == [str(awkward_shards)]


# --------------------------------------------------------------------------------------------------- the trainer


def bundled_tars(bundled_dir, folder) -> None:
    """The bundled training photos as two img2dataset tars (JPEG, quality 95)."""
    folder.mkdir()
    for shard, names in enumerate((BUNDLED_TRAIN[:4], BUNDLED_TRAIN[4:])):
        members = []
        for i, name in enumerate(names):
            buf = io.BytesIO()
            Image.open(bundled_dir / "train" / f"{name}.png").convert("RGB").save(buf, "JPEG", quality=95)
            members += [(f"{shard:05d}{i:04d}.jpg", buf.getvalue()), (f"{shard:05d}{i:04d}.txt", name.encode())]
        write_tar(folder / f"{shard:05d}.tar", members)


def test_the_codec_trains_from_tars_in_a_folder_and_in_a_bucket_to_the_same_weights_also_resumed(
        tiny_config, bundled_dir, tmp_path, local_s3, monkeypatch, fresh_accelerate_state):
    bundled_tars(bundled_dir, tmp_path / "shards")
    url = upload(local_s3, tmp_path / "shards", "shards")
    common = ("train.max_steps=4", "train.checkpoint_every=2", "optim.warmup_steps=1", "data.num_workers=1")
    weights = ("checkpoints/step_00000004/model.safetensors", "final/diffusion_pytorch_model.safetensors")

    local = train_codec(tiny_config(*common, f"data.train={tmp_path / 'shards'}",
                                    f"train.output_dir={tmp_path / 'local'}"))
    assert local.step == 4
    reset_accelerate()
    train_codec(tiny_config(*common, f"data.train={url}", f"train.output_dir={tmp_path / 'bucket'}"))
    run = yaml.safe_load((tmp_path / "bucket" / "run.yaml").read_text())
    assert run["data"].startswith(f"train: 7 images of {url};")
    assert_same_safetensors(tmp_path / "local", tmp_path / "bucket", weights)

    reset_accelerate()
    interrupted = tiny_config(*common, f"data.train={url}", f"train.output_dir={tmp_path / 'resumed'}")
    with killed_after_a_checkpoint(monkeypatch, train_module):
        train_codec(interrupted)
    assert not (tmp_path / "resumed" / "final").exists()
    assert train_codec(interrupted, resume="latest").step == 4
    assert_same_safetensors(tmp_path / "local", tmp_path / "resumed", weights)
