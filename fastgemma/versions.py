"""The torch and transformers versions fastgemma runs on, checked once when fastgemma is imported.

fastgemma replaces forwards of transformers' Gemma 2 modules, so it depends on transformers 5.x
internals that change between minor versions (between 5.17 and 5.23, gradient checkpointing moved
from ``GradientCheckpointingLayer.__call__`` into a wrapped ``forward``). Outside what we test:

- transformers with another major version than 5, or torch older than 2.6 (no usable
  flex_attention): ``ImportError`` naming the versions found and the ones needed;
- a transformers 5.x minor version outside the tested range: one warning on the ``"fastgemma"``
  logger, and fastgemma carries on.

The README's "Supported versions" table lists what CI and the GPU runs use.
"""

from __future__ import annotations

import logging
from importlib import metadata

from packaging.version import InvalidVersion, Version

TRANSFORMERS_MAJOR = 5
TRANSFORMERS_TESTED = ((5, 17), (5, 23))  # first and last tested minor versions, both included
TORCH_MINIMUM = (2, 6)

logger = logging.getLogger("fastgemma")
_warned: set[str] = set()


def installed_version(package: str) -> str:
    """The version string of an installed distribution (read from its metadata, nothing imported)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # e.g. a source build on sys.path without metadata
        module = __import__(package)
        return str(module.__version__)


def _release(version: str) -> tuple[int, ...] | None:
    try:
        return Version(version).release
    except InvalidVersion:
        return None


def check_versions() -> None:
    """Raise ImportError for an unsupported torch or transformers; warn once for an untested minor."""
    torch_version = installed_version("torch")
    transformers_version = installed_version("transformers")
    first, last = TRANSFORMERS_TESTED
    tested = f"{first[0]}.{first[1]}-{last[0]}.{last[1]}"

    torch_release = _release(torch_version)
    if torch_release is not None and torch_release[:2] < TORCH_MINIMUM:
        raise ImportError(
            f"fastgemma needs torch >= {TORCH_MINIMUM[0]}.{TORCH_MINIMUM[1]} (flex_attention); found torch "
            f"{torch_version}. Install a newer torch (see the README's install section)."
        )

    release = _release(transformers_version)
    if release is not None and release[0] != TRANSFORMERS_MAJOR:
        raise ImportError(
            f"fastgemma supports transformers {TRANSFORMERS_MAJOR}.x only (tested {tested}); found transformers "
            f"{transformers_version}. It patches transformers' Gemma 2 internals, which differ between major "
            f'versions. Install a supported one: pip install "transformers>={first[0]}.{first[1]},<{first[0] + 1}"'
        )

    if release is None or not (first <= release[:2] <= last):
        if transformers_version not in _warned:
            _warned.add(transformers_version)
            logger.warning(
                "fastgemma is tested with transformers %s; found %s. It patches transformers internals that "
                "change between minor versions: if patching or training fails, or results differ from "
                "attn_implementation='eager', use a tested version.",
                tested,
                transformers_version,
            )


check_versions()
