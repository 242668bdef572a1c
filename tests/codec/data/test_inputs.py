"""codec/data/inputs.py: tars, parquet, folders, tables and streamed Hub datasets, local and in a bucket, as units."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import tarfile
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from codec.data import InputSource, InputUnit, UnreadableImage, decode_image, load_image_dataset
from tests.codec.data.helpers import COLOURS, write_colour_folder


def jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def img2dataset_members(shard: int, count: int, no_txt=(), no_image=(), garbage=()) -> list[tuple[str, bytes]]:
    """img2dataset's layout: KEY.jpg + KEY.txt + KEY.json per sample, keys numbered across shards."""
    members = []
    for i in range(count):
        key = f"{shard:05d}{i:04d}"
        if i not in no_image:
            members.append((f"{key}.jpg", b"not a jpeg at all" if i in garbage else jpeg(COLOURS[i % len(COLOURS)])))
        if i not in no_txt:
            members.append((f"{key}.txt", f"photo {key}".encode()))
        metadata = {"key": key, "caption": f"photo {key}", "status": "success"}
        members.append((f"{key}.json", json.dumps(metadata).encode()))
    return members


@pytest.fixture
def shards(tmp_path):
    """Three img2dataset tars of three samples each (shard 1's second sample lacks its .txt)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(3):
        write_tar(folder / f"{shard:05d}.tar", img2dataset_members(shard, 3, no_txt={1} if shard == 1 else ()))
    return folder


def everything(source: InputSource) -> list[dict]:
    return [record for unit in source.units for record in source.records(unit)]


def without_source(records: list[dict]) -> list[dict]:
    """A record less where it lies: the one field a local and a bucket copy of the same data differ in."""
    return [{key: value for key, value in record.items() if key != "source"} for record in records]


def unit_identity(source: InputSource) -> list[tuple]:
    return [(unit.number, unit.name, unit.size) for unit in source.units]


# --------------------------------------------------------------------------------------------------- tars


def test_one_tar_a_folder_of_tars_and_a_brace_pattern(shards):
    folder = InputSource(shards)
    assert folder.kind == "webdataset" and folder.captions == "member:txt"
    assert folder.units == [InputUnit(k, f"{k:05d}.tar", str(shards / f"{k:05d}.tar"), None) for k in range(3)]
    records = everything(folder)
    assert [r["id"] for r in records[:4]] == ["00000.tar/000000000", "00000.tar/000000001", "00000.tar/000000002",
                                              "00001.tar/000010000"]
    assert [r["row"] for r in records[:4]] == [0, 1, 2, 0]
    assert records[2]["caption"] == "photo 000000002"
    assert decode_image(records[2]["image"]).getpixel((4, 4)) == pytest.approx(COLOURS[2], abs=3)
    assert everything(pickle.loads(pickle.dumps(folder))) == records

    one = InputSource(str(shards / "00001.tar"))
    assert unit_identity(one) == [(0, "00001.tar", None)]
    assert without_source(everything(one)) == without_source(records[3:6])

    braces = InputSource(f"{shards}/{{00000..00002}}.tar")
    assert unit_identity(braces) == unit_identity(folder) and everything(braces) == records
    assert [u.name for u in InputSource(f"{shards}/{{00002,00000}}.tar").units] == ["00000.tar", "00002.tar"]
    with pytest.raises(FileNotFoundError, match=r"1 of them missing.*00003.tar"):
        InputSource(f"{shards}/{{00001..00003}}.tar")


def test_a_pattern_lists_its_folder_once_and_no_deeper_than_it_reaches(shards, monkeypatch):
    (shards / "old").mkdir()
    write_tar(shards / "old" / "00009.tar", img2dataset_members(9, 1))
    assert [u.name for u in InputSource(shards).units][-1] == "old/00009.tar"  # a folder: every tar below it
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(path) or real_scandir(path))
    assert [u.name for u in InputSource(f"{shards}/*.tar").units] == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(listed) == 1
    assert [u.name for u in InputSource(f"{shards}/*/*.tar").units] == ["old/00009.tar"]


def test_missing_caption_is_none_and_broken_members_are_rejects_the_rest_kept(tmp_path):
    write_tar(tmp_path / "00000.tar", img2dataset_members(0, 5, no_txt={1}, no_image={2}, garbage={3}))
    source = InputSource(tmp_path / "00000.tar")
    records = everything(source)
    assert [r["row"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["caption"] == "photo 000000000" and records[1]["caption"] is None
    assert records[2]["reject"] == "no image member (members: json, txt)" and "image" not in records[2]
    with pytest.raises(UnreadableImage, match="not an image"):  # bytes got here; decoding rejects in the encoder
        decode_image(records[3]["image"])
    assert decode_image(records[4]["image"]).size == (8, 8) and records[4]["caption"] == "photo 000000004"


def test_a_truncated_tar_ends_its_unit_with_one_reject_naming_it(shards):
    whole = (shards / "00000.tar").read_bytes()
    cut = next(m.offset for m in tarfile.open(shards / "00000.tar") if m.name.endswith("2.txt"))
    # At a member boundary (tarfile alone stops silently there) and inside a member's data: either way the sample
    # being read is dropped (it may lack members) and one reject names the tar.
    for end in (cut, cut + 700):
        (shards / "00000.tar").write_bytes(whole[:end])
        records = list(InputSource(shards).records(InputSource(shards).units[0]))
        assert [r.get("caption") for r in records[:2]] == ["photo 000000000", "photo 000000001"]
        assert records[2]["id"] == "00000.tar" and records[2]["source"] == str(shards / "00000.tar")
        assert records[2]["reject"].startswith("truncated or corrupt tar after 2 samples")
        assert len(records) == 3


def test_captions_from_json_when_the_tars_have_no_txt(tmp_path):
    members = [m for m in img2dataset_members(0, 2) if not m[0].endswith(".txt")]
    write_tar(tmp_path / "00000.tar", members)
    source = InputSource(tmp_path / "00000.tar")
    assert source.captions == "member:json:caption"
    assert [r["caption"] for r in everything(source)] == ["photo 000000000", "photo 000000001"]
    assert InputSource(tmp_path / "00000.tar", caption_column="txt").captions == "member:txt"


def test_limit_is_refused_for_tars(shards):
    with pytest.raises(ValueError, match="limit=2 needs the records per unit"):
        InputSource(shards, limit=2)


# --------------------------------------------------------------------------------------------------- parquet


def write_img2dataset_parquet(path, first: int, count: int, missing_image=()) -> None:
    keys = [f"{i:09d}" for i in range(first, first + count)]
    numbers = range(first, first + count)
    pq.write_table(pa.table({
        "key": keys,
        "jpg": [None if i - first in missing_image else jpeg(COLOURS[i % len(COLOURS)]) for i in numbers],
        "caption": [f"photo {k}" for k in keys],
        "width": [8] * count,
    }), path)


def test_img2dataset_parquet_files_sizes_from_footers_and_limit(tmp_path, offline):
    folder = tmp_path / "parquet"
    folder.mkdir()
    write_img2dataset_parquet(folder / "part-0.parquet", 0, 3, missing_image={1})
    write_img2dataset_parquet(folder / "part-1.parquet", 3, 2)
    source = InputSource(folder)
    assert (source.kind, source.image_column, source.captions) == ("parquet", "jpg", "column:caption")
    assert unit_identity(source) == [(0, "part-0.parquet", 3), (1, "part-1.parquet", 2)]
    records = everything(source)
    assert [r["id"] for r in records] == [f"part-{i // 3}.parquet/{i:09d}" for i in range(5)]
    assert records[1]["reject"] == "no image in the row"
    assert records[4]["caption"] == "photo 000000004"
    assert decode_image(records[4]["image"]).getpixel((4, 4)) == pytest.approx(COLOURS[4], abs=3)

    limited = InputSource(folder, limit=4)
    assert unit_identity(limited) == [(0, "part-0.parquet", 3), (1, "part-1.parquet", 1)]
    assert everything(limited) == records[:4]

    table, column = load_image_dataset(folder / "part-1.parquet")  # the map-style loader takes it too (an index)
    assert column == "image" and decode_image(table[0]["image"]).getpixel((4, 4)) == pytest.approx(COLOURS[3], abs=3)


# --------------------------------------------------------------------------------------------------- buckets


def upload(local_s3, folder, prefix: str) -> str:
    import fsspec

    url = f"{local_s3.new_bucket()}/{prefix}"
    fs, path = fsspec.core.url_to_fs(url)
    for name in sorted(os.listdir(folder)):
        fs.put_file(str(folder / name), f"{path}/{name}")
    return url


def test_the_same_tars_parquet_and_images_in_a_bucket_give_the_same_units_and_records(
        shards, tmp_path, local_s3, offline):
    url = upload(local_s3, shards, "laion/shards")
    local, remote = InputSource(shards), InputSource(url)
    assert remote.units[0].location == f"{url}/00000.tar"
    assert unit_identity(remote) == unit_identity(local) and remote.captions == local.captions
    assert without_source(everything(remote)) == without_source(everything(local))
    assert unit_identity(InputSource(f"{url}/{{00000..00002}}.tar")) == unit_identity(local)

    write_img2dataset_parquet(tmp_path / "part-0.parquet", 0, 3)
    url = upload(local_s3, tmp_path, "parquet")
    local, remote = InputSource(tmp_path / "part-0.parquet"), InputSource(f"{url}/part-0.parquet")
    assert unit_identity(remote) == unit_identity(local)
    assert without_source(everything(remote)) == without_source(everything(local))

    names = write_colour_folder(tmp_path / "imgs", [(4, 4)] * 3)
    (tmp_path / "imgs" / "0.txt").write_text("a red square")
    url = upload(local_s3, tmp_path / "imgs", "imgs")
    local, remote = InputSource(tmp_path / "imgs", unit_size=2), InputSource(url, unit_size=2)
    assert unit_identity(remote) == unit_identity(local) == [(0, "files-000000", 2), (1, "files-000001", 1)]
    strip = [{k: v for k, v in r.items() if k not in ("source", "image")} for r in everything(remote)]
    assert strip == [{k: v for k, v in r.items() if k not in ("source", "image")} for r in everything(local)]
    assert [r["caption"] for r in everything(remote)] == ["a red square", None, None]
    assert decode_image(everything(remote)[1]["image"]).getpixel((0, 0)) == COLOURS[1]
    assert [r["id"] for r in everything(remote)] == names


def test_an_empty_prefix_and_an_unreachable_endpoint_are_one_clear_line(local_s3, monkeypatch):
    bucket = local_s3.new_bucket()
    with pytest.raises(ValueError, match=f"no data under {bucket}/nothing"):
        InputSource(f"{bucket}/nothing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(OSError, match=rf"cannot reach {bucket}/shards \(AWS_ENDPOINT_URL=http://127.0.0.1:{port}\)"):
        InputSource(f"{bucket}/shards")
    assert time.monotonic() - started < 10


# --------------------------------------------------------------------------------------------------- folders


def test_a_folder_is_listed_once_per_directory_and_cut_into_units(tmp_path, monkeypatch):
    write_colour_folder(tmp_path / "imgs", [(4, 4)] * 2)
    write_colour_folder(tmp_path / "imgs" / "b", [(4, 4)] * 3)
    write_colour_folder(tmp_path / "imgs" / "b" / "c", [(4, 4)] * 1)
    (tmp_path / "imgs" / "b" / "1.txt").write_text("  a green square\n")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"partial")
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(path) or real_scandir(path))
    source = InputSource(tmp_path / "imgs", unit_size=4)
    assert len(listed) == 3  # imgs, imgs/b, imgs/b/c
    assert source.kind == "folder" and source.captions == "sidecar:.txt"
    assert unit_identity(source) == [(0, "files-000000", 4), (1, "files-000001", 2)]
    records = everything(source)
    assert [r["id"] for r in records] == ["0.png", "1.png", "b/0.png", "b/1.png", "b/2.png", "b/c/0.png"]
    assert [r["caption"] for r in records] == [None, None, None, "a green square", None, None]
    assert [r["row"] for r in records] == [0, 1, 2, 3, 0, 1]
    assert records[3]["image"] == {"bytes": None, "path": str(tmp_path / "imgs" / "b" / "1.png")}

    limited = InputSource(tmp_path / "imgs", unit_size=4, limit=5)
    assert unit_identity(limited) == [(0, "files-000000", 4), (1, "files-000001", 1)]
    assert everything(limited) == records[:5]


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_folder_captions_from_metadata_and_pickling(tmp_path, metadata):
    names = write_colour_folder(tmp_path / "imgs", [(4, 4)] * 3)
    rows = [{"file_name": name, "text": f"caption of {name}"} for name in names[:2]]  # the third has none
    if metadata.endswith(".jsonl"):
        (tmp_path / "imgs" / metadata).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        lines = [f"{row['file_name']},{row['text']}\n" for row in rows]
        (tmp_path / "imgs" / metadata).write_text("file_name,text\n" + "".join(lines))
    source = InputSource(tmp_path / "imgs", unit_size=2)
    assert source.captions == "column:text"
    records = everything(source)
    assert [r["caption"] for r in records] == ["caption of 0.png", "caption of 1.png", None]
    copy = pickle.loads(pickle.dumps(source))
    assert copy.units == source.units and everything(copy) == records
    with pytest.raises(ValueError, match="'words' is not a column"):
        InputSource(tmp_path / "imgs", caption_column="words")


def test_saved_dataset_in_row_blocks_and_pickling(tmp_path, offline):
    names = write_colour_folder(tmp_path / "src", [(4, 4)] * 5)
    table = datasets.Dataset.from_dict({"photo": [str(tmp_path / "src" / n) for n in names],
                                        "caption": [f"c{i}" for i in range(5)]})
    table.cast_column("photo", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    source = InputSource(tmp_path / "saved", unit_size=2)
    assert (source.kind, source.image_column, source.captions) == ("table", "photo", "column:caption")
    assert unit_identity(source) == [(0, "rows-000000", 2), (1, "rows-000001", 2), (2, "rows-000002", 1)]
    copy = pickle.loads(pickle.dumps(source))
    records = everything(copy)
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"] and records[3]["caption"] == "c3"
    assert [r["row"] for r in records] == [0, 1, 0, 1, 0]
    assert decode_image(records[4]["image"]).getpixel((0, 0)) == COLOURS[4]
    assert unit_identity(InputSource(tmp_path / "saved", unit_size=2, limit=3))[-1] == (1, "rows-000001", 1)


# --------------------------------------------------------------------------------------------------- the Hub


def test_a_streamed_hub_dataset_has_its_shards_as_units(monkeypatch):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})

    def rows(shards):
        for shard in shards:
            for i in range(2):
                yield {"image": {"bytes": jpeg(COLOURS[i]), "path": None}, "text": f"{shard}{i}"}

    calls = []

    def streamed(name, split, streaming):
        calls.append((name, split, streaming))
        return datasets.IterableDataset.from_generator(rows, features=features, gen_kwargs={"shards": ["a", "b", "c"]})

    monkeypatch.setattr(datasets, "load_dataset", streamed)
    source = InputSource("someone/photos", split="train")
    assert calls == [("someone/photos", "train", True)]
    assert (source.kind, source.captions) == ("hub", "column:text")
    assert unit_identity(source) == [(0, "shard-00000", None), (1, "shard-00001", None), (2, "shard-00002", None)]
    records = list(pickle.loads(pickle.dumps(source)).records(source.units[1]))
    assert [(r["id"], r["caption"]) for r in records] == [("shard-00001/0", "b0"), ("shard-00001/1", "b1")]
    assert decode_image(records[1]["image"]).getpixel((4, 4)) == pytest.approx(COLOURS[1], abs=3)
    with pytest.raises(ValueError, match="limit=1 needs the records per unit"):
        InputSource("someone/photos", limit=1)


def test_an_unknown_hub_name_says_what_to_pass(offline):
    with pytest.raises(RuntimeError, match="webdataset tars or a bucket URL"):
        InputSource("nobody-xyz/no-such-dataset-123")
