"""What `pip install .` installs, read off the wheel itself: a user without the checkout gets the command, the
presets it finds by name and the warm start's fitted codec, and not the experiments."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_the_wheel_holds_the_command_the_presets_and_no_experiments(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("latent_codec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert {f"latent_codec/configs/{p}" for p in presets} <= names and "latent_codec/configs/codec/tiny.yaml" in names
    assert {"codec/network/linear_codec_f8c4.json", "codec/network/linear_codec_f4c4.json",
            "codec/exchange/pipeline.py", "latent_codec/commands/codec_train.py"} <= names
    assert not [n for n in names if n.startswith(("experiments/", "tests/", "scripts/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "latent-codec = latent_codec.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
