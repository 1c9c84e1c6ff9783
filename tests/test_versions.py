"""fastgemma.versions: clear errors outside the supported torch / transformers, one warning for an untested minor."""

import logging
import re
import subprocess
import sys

import pytest

from fastgemma import versions


@pytest.fixture
def installed(monkeypatch):
    """Pretend other torch / transformers versions are installed; forget earlier warnings."""
    found = {"torch": "2.13.0+cpu", "transformers": "5.23.0"}
    monkeypatch.setattr(versions, "installed_version", lambda package: found[package])
    monkeypatch.setattr(versions, "_warned", set())
    return found


def fastgemma_records(caplog):
    return [r for r in caplog.records if r.name == "fastgemma" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("torch_version", ["2.6.0", "2.11.0+cu130", "2.13.0+cpu", "2.14.0.dev20270101", "3.0.0"])
@pytest.mark.parametrize("transformers_version", ["5.17.0", "5.20.1", "5.23.0", "5.23.0.dev0"])
def test_tested_versions_pass_quietly(installed, caplog, torch_version, transformers_version):
    installed.update(torch=torch_version, transformers=transformers_version)
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        versions.check_versions()
    assert fastgemma_records(caplog) == []


@pytest.mark.parametrize("transformers_version", ["4.57.1", "6.0.0", "6.0.0.dev0", "7.1.0"])
def test_another_transformers_major_is_refused(installed, transformers_version):
    installed["transformers"] = transformers_version
    with pytest.raises(ImportError, match=r"transformers 5\.x only \(tested 5\.17-5\.23\); found transformers " + re.escape(transformers_version)):
        versions.check_versions()


@pytest.mark.parametrize("torch_version", ["2.5.1", "2.5.1+cu124", "2.4.0", "1.13.1"])
def test_torch_older_than_2_6_is_refused(installed, torch_version):
    installed["torch"] = torch_version
    with pytest.raises(ImportError, match=r"torch >= 2\.6 .*found torch " + re.escape(torch_version)):
        versions.check_versions()


@pytest.mark.parametrize("transformers_version", ["5.0.0", "5.16.2", "5.24.0", "5.24.0.dev0", "5.30.1"])
def test_untested_transformers_minor_warns_once(installed, caplog, transformers_version):
    installed["transformers"] = transformers_version
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        versions.check_versions()
        versions.check_versions()
    records = fastgemma_records(caplog)
    assert len(records) == 1
    assert "tested with transformers 5.17-5.23" in records[0].getMessage()
    assert f"found {transformers_version}" in records[0].getMessage()


def test_unparsable_versions_warn_instead_of_failing(installed, caplog):
    installed.update(torch="custom-build", transformers="main")
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        versions.check_versions()
    assert len(fastgemma_records(caplog)) == 1


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
