"""pytest plugin of run.py: with FASTGEMMA_HF_SUITE_PATCH=1, every Gemma 2 model that Hugging Face's
tests build is passed through `fastgemma.patch_model(model, backend="auto")` as its construction ends.
With FASTGEMMA_HF_SUITE_RESULTS=PATH it writes each test's outcome there (JSON; a test fails when it or
one of its subtests fails, and counts as skipped only when the test itself skipped).

run.py copies this file into the prepared transformers test tree (tests/models/gemma2/conftest.py);
without the variables it does nothing. The project's own pytest run never loads it (tests/conftest.py
ignores tests/hf_suite/).
"""

import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

ENABLED = os.environ.get("FASTGEMMA_HF_SUITE_PATCH") == "1"
RESULTS = os.environ.get("FASTGEMMA_HF_SUITE_RESULTS")

_construction = threading.local()  # depth of nested Gemma 2 __init__ calls (a head builds its backbone)
_counts = {"patched": 0}
_outcomes = {}  # "Class::test" -> [outcome, first error line]


def _patch_on_construction(cls, patch_model):
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        depth = getattr(_construction, "depth", 0)
        _construction.depth = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _construction.depth = depth
        if depth == 0 and type(self) is cls:  # the outermost model only, once it is complete
            patch_model(self, backend="auto")
            _counts["patched"] += 1

    __init__.__wrapped__ = init
    cls.__init__ = __init__


def _glue_from_the_same_checkout(fastgemma):
    """Import `fastgemma.patches` from the checkout that `fastgemma` came from.

    Imported from a source checkout on PYTHONPATH, fastgemma finds no fastgemma/patches/; an editable
    install of another checkout would then answer `fastgemma.patches` with that checkout's glue.
    """
    glue = Path(fastgemma.__file__).resolve().parents[1] / "patches" / "__init__.py"
    if not glue.exists() or "fastgemma.patches" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("fastgemma.patches", glue, submodule_search_locations=[str(glue.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastgemma.patches"] = module
    spec.loader.exec_module(module)
    fastgemma.patches = module


def pytest_configure(config):
    if not ENABLED:
        return
    import fastgemma

    _glue_from_the_same_checkout(fastgemma)
    from transformers.models.gemma2 import modeling_gemma2

    for name in ("Gemma2Model", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "Gemma2ForTokenClassification"):
        _patch_on_construction(getattr(modeling_gemma2, name), fastgemma.patch_model)


def pytest_report_header(config):
    return f"fastgemma HF suite: {'PATCHED (every Gemma 2 model built is patch_model(backend=auto)-ed)' if ENABLED else 'stock'}"


def pytest_terminal_summary(terminalreporter):
    if ENABLED:
        import fastgemma
        import fastgemma.patches.gemma2 as glue

        terminalreporter.write_line(f"fastgemma HF suite: patched {_counts['patched']} Gemma 2 models with "
                                    f"{Path(fastgemma.__file__).parent} and {Path(glue.__file__).parent}")


def _error_line(report) -> str:
    lines = report.longreprtext.splitlines()
    errors = [line[1:].strip() for line in lines if line.startswith("E ") and line[1:].strip()]
    return " | ".join(errors[:3] or lines[-1:])


def pytest_runtest_logreport(report):
    if not RESULTS:
        return
    test = report.nodeid.split("::", 1)[-1]
    outcome = _outcomes.setdefault(test, ["passed", ""])
    if report.failed and outcome[0] != "failed":
        outcome[:] = ["failed", _error_line(report)]
    elif report.skipped and outcome[0] == "passed" and type(report).__name__ != "SubtestReport":
        outcome[:] = ["skipped", ""]


def pytest_sessionfinish(session):
    if RESULTS:
        with open(RESULTS, "w") as f:
            json.dump(_outcomes, f, indent=1)
