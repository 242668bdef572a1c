import os

import pytest

from codec.common.atomic import folder_atomically, write_bytes_atomically, write_text_atomically


def test_write_text_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    write_text_atomically(path, "new text")
    assert path.read_text() == "new text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "shard.safetensors"
    write_bytes_atomically(path, b"complete", fsync=True)

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the temp file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomically(path, b"half")
    assert path.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.safetensors"]  # the temp file is removed


def test_folder_appears_only_when_complete(tmp_path):
    final = tmp_path / "final"
    with folder_atomically(final) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not final.exists()
    assert (final / "config.json").read_text() == "{}"

    with pytest.raises(RuntimeError):
        with folder_atomically(final) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("killed mid-export")
    assert (final / "config.json").read_text() == "{}"  # the previous export is untouched

    with folder_atomically(final) as tmp:  # the next export clears the stale temp folder first
        assert list(tmp.iterdir()) == []
        (tmp / "weights").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
