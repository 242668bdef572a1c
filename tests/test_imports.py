"""The floors, read off the source (AST): every import points down, never up.

codec (the VAE and what it makes) <- diffusion (the latent U-Net) <- latent_codec (the command) ; experiments sit on
top of all three and nothing imports them. The exported pipeline's one file imports only what a machine without
this project has. The library never runs a script or finds the checkout through its own path.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("codec", "diffusion", "latent_codec", "experiments", "tests", "scripts", "configs")
# What each floor may import of the first-party packages.
ALLOWED = {
    "codec": {"codec"},
    "diffusion": {"codec", "diffusion"},
    "latent_codec": {"codec", "diffusion", "latent_codec"},
    "experiments": {"codec", "diffusion", "latent_codec", "experiments"},
}
PORTABLE = ROOT / "codec" / "exchange" / "pipeline.py"
PORTABLE_MAY_IMPORT = {"__future__", "torch", "numpy", "PIL", "diffusers"}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
    return found


def python_files(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_every_import_points_down_a_floor(floor):
    upward = [f"{path.relative_to(ROOT)}:{line} imports {module}"
              for path in python_files(floor) for line, module in imported_modules(path)
              if module.split(".")[0] in FIRST_PARTY and module.split(".")[0] not in ALLOWED[floor]]
    assert upward == []


def test_the_exported_pipeline_file_imports_only_what_stock_diffusers_has():
    """The file a pipeline folder carries runs where neither codec nor diffusion is installed."""
    foreign = [f"line {line}: {module}" for line, module in imported_modules(PORTABLE)
               if module.split(".")[0] not in PORTABLE_MAY_IMPORT | set(sys.stdlib_module_names)]
    assert foreign == []


def test_the_walk_sees_every_kind_of_import(tmp_path):
    """The rule is not vacuous: absolute, relative and function-level imports are all found and resolved."""
    module = tmp_path / "codec" / "network" / "model.py"
    module.parent.mkdir(parents=True)
    module.write_text("import diffusion.unet\nfrom ..data import x\nfrom . import y\n\n\ndef f():\n"
                      "    from diffusion.train import z\n")
    assert sorted(imported_modules(module, tmp_path)) == [(1, "diffusion.unet"), (2, "codec.data"),
                                                          (3, "codec.network"), (7, "diffusion.train")]


def test_the_library_runs_no_script_and_finds_no_checkout():
    """No subprocess, no scripts/ path, no Path(__file__).parents[...] to reach the checkout: an installed package
    has neither scripts/ nor configs/ beside it."""
    found = []
    for top in ("codec", "diffusion", "latent_codec"):
        for path in python_files(top):
            tree = ast.parse(path.read_text())
            # Docstrings may tell a reader about scripts/ (the old names' shims); code may not use such a path.
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr == "parents":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .parents")
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and "scripts/" in node.value
                        and id(node) not in docstrings):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} names scripts/")
            found += [f"{path.relative_to(ROOT)}:{line} imports subprocess"
                      for line, module in imported_modules(path) if module == "subprocess"]
    assert found == []


def test_every_package_is_installed_and_experiments_are_not():
    """pyproject lists the packages (configs/ is mapped into latent_codec): a new sub-package left off the list
    would be missing from `pip install .` while every test run from the checkout still passed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    in_tree = {".".join(p.parent.relative_to(ROOT).parts) for top in ("codec", "diffusion", "latent_codec")
               for p in (ROOT / top).rglob("__init__.py")}
    presets = {"latent_codec.configs", *(f"latent_codec.configs.{d.name}" for d in (ROOT / "configs").iterdir()
                                         if d.is_dir() and d.name != "__pycache__")}
    assert listed == in_tree | presets
