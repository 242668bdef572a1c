import os

import pytest

from codec.common.atomic import folder_atomically, write_atomically, write_bytes_atomically, write_text_atomically


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


# ---------------------------------------------------------------------------------------------------------------
# Modes: what others can read. safetensors' save_file (0.8) creates its file 0600 whatever the umask, and it
# writes our exported codecs, pipelines, LDM files and checkpoints (through save_pretrained, accelerate's
# save_state and our EMA file): another account, a ComfyUI server, could not read them.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root):
    """{relative path: mode} of everything under root (pytest makes root itself 0700)."""
    import stat

    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in root.rglob("*")}


def _plain(umask: int, folder: bool = False) -> str:
    """What open(path, "w") (or mkdir) gives under this umask."""
    return oct((0o777 if folder else 0o666) & ~umask)


def _expected(root, umask):
    return {name: _plain(umask, (root / name).is_dir()) for name in _modes(root)}


def test_atomic_writes_leave_the_mode_a_plain_open_gives(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "vae.safetensors"
    write_atomically(path, lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))  # how ldm_format writes
    write_text_atomically(tmp_path / "report.md", "text")
    assert _modes(tmp_path) == _expected(tmp_path, umask)


def test_exported_folders_and_checkpoints_are_readable_by_others(tmp_path, umask, fresh_accelerate_state):
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    from codec.common.checkpoints import save_checkpoint

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    with folder_atomically(tmp_path / "final") as tmp:  # how the trainers export
        vae.save_pretrained(tmp, safe_serialization=True)
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, step=1, keep=1)
    assert (tmp_path / "checkpoints" / "step_00000001" / "model.safetensors").is_file() and model is not None
    assert _modes(tmp_path) == _expected(tmp_path, umask)
