"""Maps suite names to their modules (imported lazily: each suite pulls in its own dependencies)."""

from __future__ import annotations

import importlib

_MODULES = {
    "kernel": "benchmarks.suite_kernel",
    "model": "benchmarks.suite_model",
    "trl": "benchmarks.suite_trl",
    "context": "benchmarks.suite_context",
}


def get_suite(name: str):
    return importlib.import_module(_MODULES[name])


def table_for(name: str, rows: list[dict]) -> str:
    return get_suite(name).table(rows)
