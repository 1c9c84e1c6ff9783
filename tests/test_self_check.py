"""fastgemma.self_check: on versions outside the tested ranges, patch_model compares stock and patched first."""

import logging

import pytest

import fastgemma
from fastgemma import self_check, versions
from fastgemma.patches import gemma2
from conftest import random_gemma2, tiny_gemma2_config


@pytest.fixture
def untested(monkeypatch):
    """Pretend the installed transformers is outside the tested range; forget earlier verdicts."""
    monkeypatch.setitem(versions.TESTED, "transformers", ((5, 0), (5, 1)))
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.delenv(self_check.ALLOW_UNTESTED, raising=False)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fastgemma" and r.levelno == logging.WARNING]


def test_the_check_passes_on_the_installed_transformers():
    assert gemma2.self_check() == []


def test_an_untested_version_is_checked_once_then_patched(untested, caplog, monkeypatch):
    calls = []
    real = gemma2.self_check
    monkeypatch.setattr(gemma2, "self_check", lambda: calls.append(1) or real())
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        for _ in range(2):
            model = fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), backend="eager")
            assert fastgemma.is_patched(model)
    assert len(calls) == 1
    (message,) = warnings_of(caplog)
    assert f"transformers {versions.installed_version('transformers')} (tested 5.0-5.1): untested; self-check passed" \
        in message


def test_tested_versions_run_no_check(monkeypatch):
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.setattr(versions, "untested_versions", lambda: {})
    monkeypatch.setattr(gemma2, "self_check", lambda: pytest.fail("checked a tested version"))
    fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), backend="eager")


def test_a_glue_that_loses_the_kv_cache_is_refused_in_one_line(untested, monkeypatch):
    # What transformers 5.24 did to the old glue: the cache arrived under a name it did not read.
    monkeypatch.setattr(gemma2, "pop_cache", lambda kwargs: (kwargs.pop("cache", None), kwargs.pop("past_key_values", None)) and None)
    model = random_gemma2(tiny_gemma2_config())
    with pytest.raises(fastgemma.UntestedVersionError) as error:
        fastgemma.patch_model(model)
    message = str(error.value)
    assert "\n" not in message
    assert f"transformers {versions.installed_version('transformers')} (tested 5.0-5.1)" in message
    assert "cached decode step 1 logits differ" in message
    assert versions.install_command("transformers") in message and self_check.ALLOW_UNTESTED in message
    assert not fastgemma.is_patched(model)


def test_a_check_that_crashes_is_a_refusal(untested, monkeypatch):
    monkeypatch.setattr(gemma2, "self_check", lambda: {}["moved internals"])
    with pytest.raises(fastgemma.UntestedVersionError, match="the check raised KeyError"):
        fastgemma.patch_model(random_gemma2(tiny_gemma2_config()))


def test_the_escape_hatch_patches_anyway_with_a_warning(untested, monkeypatch, caplog):
    monkeypatch.setattr(gemma2, "self_check", lambda: ["training losses differ (relative error 0.5)"])
    monkeypatch.setenv(self_check.ALLOW_UNTESTED, "1")
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        model = fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), backend="eager")
    assert fastgemma.is_patched(model)
    (message,) = warnings_of(caplog)
    assert "training losses differ" in message and "Patching anyway" in message
