"""What an install of fastgemma adds: one top-level module, `fastgemma`, with the model glue as `fastgemma.patches`.

The repository keeps the glue in its top-level folder patches/; pyproject.toml maps it into the package
([tool.setuptools] package-dir). These tests build a wheel from a copy of the sources and import it,
and import a source checkout that is not installed, each in a fresh interpreter that sees the test
environment's dependencies but not its (editable) fastgemma.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "fastgemma", "patches"]

# A tiny Gemma 2, patched and run once: enough to show that fastgemma found its model glue.
PATCH_A_TINY_GEMMA2 = """
import importlib.util, sys, torch
from transformers import Gemma2Config, Gemma2ForCausalLM
import fastgemma
config = Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=64, vocab_size=50, attn_implementation="eager")
model = fastgemma.patch_model(Gemma2ForCausalLM(config), max_row_tokens=32, backend="eager")
assert fastgemma.is_patched(model)
model(torch.arange(10)[None])
glue = [name for name in sys.modules if name.endswith("gemma2") and "patches" in name]
print("fastgemma", fastgemma.__file__)
print("glue", glue)
print("top-level patches", importlib.util.find_spec("patches") is not None)
"""


def copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)
    return dest


def outside_the_checkout(entries) -> list[str]:
    """Path entries without this checkout (and its tests/), which would put its fastgemma/ and patches/ in view."""
    return [e for e in entries if e and Path(e).resolve() not in (REPO, REPO / "tests")]


def run_isolated(code: str, path: list[Path], cwd: Path) -> str:
    """Run `code` in a fresh interpreter whose sys.path is `path` + this one's, less the checkout.

    `-I -S`: no PYTHONPATH, no current folder, no site module, so no .pth file runs and an editable install
    of fastgemma stays invisible; the dependencies come from this interpreter's own path entries.
    """
    site_dirs = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    entries = [str(p) for p in path] + outside_the_checkout(dict.fromkeys(sys.path + site_dirs))
    prelude = f"import sys; sys.path[:] = {entries!r}\n"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = copy_sources(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), "."],
        cwd=source, check=True, capture_output=True, timeout=300,
    )
    (built,) = dist.glob("fastgemma-*.whl")
    return built


def test_the_wheel_holds_only_the_fastgemma_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    (dist_info,) = [name for name in top_level if name.endswith(".dist-info")]
    assert top_level == {"fastgemma", dist_info}

    expected = {f"fastgemma/{p.relative_to(REPO / 'fastgemma').as_posix()}" for p in (REPO / "fastgemma").rglob("*.py")}
    expected |= {f"fastgemma/patches/{p.relative_to(REPO / 'patches').as_posix()}" for p in (REPO / "patches").rglob("*.py")}
    assert expected <= set(names), f"missing from the wheel: {sorted(expected - set(names))}"

    if f"{dist_info}/top_level.txt" in names:
        assert zipfile.ZipFile(wheel).read(f"{dist_info}/top_level.txt").decode().split() == ["fastgemma"]
    assert any(name.startswith(f"{dist_info}/") and name.endswith("LICENSE") for name in names)


def test_the_installed_wheel_finds_its_glue_as_fastgemma_patches(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = run_isolated(PATCH_A_TINY_GEMMA2, [site], cwd=tmp_path)
    assert f"fastgemma {site / 'fastgemma' / '__init__.py'}" in out
    assert "glue ['fastgemma.patches.gemma2']" in out
    assert "top-level patches False" in out


def test_a_checkout_that_is_not_installed_still_patches(tmp_path):
    """A checkout on sys.path that is not installed (PYTHONPATH=checkout): patch_model uses the checkout's patches/."""
    checkout = copy_sources(tmp_path / "checkout")
    out = run_isolated(PATCH_A_TINY_GEMMA2, [checkout], cwd=tmp_path)
    assert f"fastgemma {checkout / 'fastgemma' / '__init__.py'}" in out
    assert "glue ['patches.gemma2']" in out


def editable_source() -> Path | None:
    """The source folder of an editable install of fastgemma in this environment, if that is what it is."""
    for dist in metadata.distributions(name="fastgemma"):  # a source folder's fastgemma.egg-info may come first
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        if info.get("dir_info", {}).get("editable"):
            return Path(info["url"].removeprefix("file://"))
    return None


@pytest.mark.skipif(editable_source() != REPO, reason="fastgemma is not installed editable from this checkout")
def test_the_editable_install_maps_patches_into_the_package(tmp_path):
    code = "import importlib.util, fastgemma.patches as p; print(p.__file__); print(importlib.util.find_spec('patches'))"
    pythonpath = os.pathsep.join(outside_the_checkout(os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    glue_file, top_level = result.stdout.split()
    assert Path(glue_file) == REPO / "patches" / "__init__.py"
    assert top_level == "None"
