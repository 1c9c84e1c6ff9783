"""fastgemma.versions: clear errors where nothing can work, and which installed versions are outside the tested ranges."""

import logging
import re
import subprocess
import sys

import pytest

from fastgemma import versions


@pytest.fixture
def installed(monkeypatch):
    """Pretend other torch / transformers versions are installed."""
    found = {"torch": "2.13.0+cpu", "transformers": "5.23.0"}
    monkeypatch.setattr(versions, "installed_version", lambda package: found[package])
    return found


def fastgemma_records(caplog):
    return [r for r in caplog.records if r.name == "fastgemma" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("torch_version", ["2.6.0", "2.11.0+cu130", "2.13.0+cpu", "2.15.0", "3.0.0"])
@pytest.mark.parametrize("transformers_version", ["5.0.0", "5.17.0", "5.25.0", "5.30.1"])
def test_every_torch_2_6_and_transformers_5_imports(installed, caplog, torch_version, transformers_version):
    installed.update(torch=torch_version, transformers=transformers_version)
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        versions.check_versions()
    assert fastgemma_records(caplog) == []  # untested ones are checked by patch_model (test_self_check.py)


@pytest.mark.parametrize("transformers_version", ["4.57.1", "6.0.0", "6.0.0.dev0", "7.1.0"])
def test_another_transformers_major_is_refused(installed, transformers_version):
    installed["transformers"] = transformers_version
    with pytest.raises(ImportError, match=r"transformers 5\.x only \(tested 5\.17-5\.25\); found transformers "
                       + re.escape(transformers_version) + ".*" + re.escape(versions.INSTALL_TESTED)):
        versions.check_versions()


@pytest.mark.parametrize("torch_version", ["2.5.1", "2.5.1+cu124", "2.4.0", "1.13.1"])
def test_torch_older_than_2_6_is_refused(installed, torch_version):
    installed["torch"] = torch_version
    with pytest.raises(ImportError, match=r"torch >= 2\.6 .*found torch " + re.escape(torch_version)):
        versions.check_versions()


@pytest.mark.parametrize("torch_version, transformers_version, expected", [
    ("2.11.0+cu130", "5.17.0", {}),
    ("2.13.0+cpu", "5.25.0", {}),
    ("2.12.1", "5.20.1", {}),
    ("2.13.0", "5.23.0.dev0", {}),
    ("2.15.0", "5.25.0", {}),
    ("2.16.0", "5.25.0", {"torch": "2.16.0"}),
    ("2.10.0", "5.16.2", {"torch": "2.10.0", "transformers": "5.16.2"}),
    ("2.13.0", "5.26.0", {"transformers": "5.26.0"}),
    ("custom-build", "main", {"torch": "custom-build", "transformers": "main"}),
])
def test_untested_versions_are_named(installed, torch_version, transformers_version, expected):
    installed.update(torch=torch_version, transformers=transformers_version)
    assert versions.untested_versions() == expected


def test_pyproject_lets_pip_resolve_only_tested_transformers():
    """A fresh install must resolve a transformers that CI tests: the cap sits just above the newest tested one."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    (requirement,) = [Requirement(r) for r in project["dependencies"] if r.startswith("transformers")]
    (first_major, first_minor), (last_major, last_minor) = versions.TESTED["transformers"]
    assert Version(f"{first_major}.{first_minor}.0") in requirement.specifier
    assert Version(f"{last_major}.{last_minor}.99") in requirement.specifier
    assert Version(f"{last_major}.{last_minor + 1}.0") not in requirement.specifier
    assert Version(f"{first_major}.{first_minor - 1}.99") not in requirement.specifier
    (install,) = [Requirement(word.strip('"')) for word in versions.INSTALL_TESTED.split() if "transformers" in word]
    assert install.specifier == requirement.specifier


def test_reads_the_installed_versions():
    import torch
    import transformers

    assert versions.installed_version("torch").split("+")[0] == torch.__version__.split("+")[0]
    assert versions.installed_version("transformers") == transformers.__version__


def test_import_fails_clearly_on_an_unsupported_transformers():
    """The check runs when fastgemma is imported, before anything that touches transformers' internals."""
    code = (
        "from importlib import metadata\n"
        "real = metadata.version\n"
        "metadata.version = lambda name: '4.46.0' if name == 'transformers' else real(name)\n"
        "import fastgemma\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ImportError: fastgemma supports transformers 5.x only" in result.stderr
    assert "found transformers 4.46.0" in result.stderr
