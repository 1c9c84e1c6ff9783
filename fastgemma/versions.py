"""The torch and transformers versions fastgemma runs on.

fastgemma replaces forwards of transformers' Gemma 2 modules, so it depends on transformers internals
that change between minor versions (5.24 renamed the KV cache argument of every forward). Policy:

- ``import fastgemma`` raises ``ImportError`` for transformers of another major version than 5, or
  torch older than the minimum: nothing there can work;
- versions inside the tested ranges (``TESTED``; CI runs both ends of each) patch without a word;
- any other version makes ``patch_model`` check itself once per process before patching
  (``fastgemma.self_check``): stock against patched on a tiny random model. It refuses when they
  disagree, and logs one line when they agree.

pyproject.toml caps transformers and torch below their next untested minor versions, so a fresh
``pip install`` resolves tested ones.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

TRANSFORMERS_MAJOR = 5
TORCH_MINIMUM = (2, 6)
# First and last tested minor versions, both included. CI tests both ends of each on the CPU (the oldest
# transformers with the oldest torch, the GPU image's pair; the newest with the newest).
TESTED = {"transformers": ((5, 17), (5, 25)), "torch": ((2, 11), (2, 15))}


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


def tested_range(package: str) -> str:
    (a, b), (c, d) = TESTED[package]
    return f"{a}.{b}-{c}.{d}"


def install_command(package: str) -> str:
    """The pip command that installs a tested version of `package`."""
    (a, b), (c, d) = TESTED[package]
    return f'pip install "{package}>={a}.{b},<{c}.{d + 1}"'


# The command that installs the newest tested transformers.
INSTALL_TESTED = install_command("transformers")


def untested_versions() -> dict[str, str]:
    """{package: installed version} for torch / transformers outside the tested ranges (empty when both are in)."""
    found = {}
    for package, (first, last) in TESTED.items():
        version = installed_version(package)
        release = _release(version)
        if release is None or not (first <= release[:2] <= last):
            found[package] = version
    return found


def check_versions() -> None:
    """Raise ImportError for a torch or transformers that fastgemma cannot run on at all."""
    torch_version = installed_version("torch")
    transformers_version = installed_version("transformers")

    torch_release = _release(torch_version)
    if torch_release is not None and torch_release[:2] < TORCH_MINIMUM:
        raise ImportError(
            f"fastgemma needs torch >= {TORCH_MINIMUM[0]}.{TORCH_MINIMUM[1]} (flex_attention); found torch "
            f"{torch_version}. Install a newer torch (see the README's install section)."
        )

    release = _release(transformers_version)
    if release is not None and release[0] != TRANSFORMERS_MAJOR:
        raise ImportError(
            f"fastgemma supports transformers {TRANSFORMERS_MAJOR}.x only (tested {tested_range('transformers')}); "
            f"found transformers {transformers_version}. It patches transformers' Gemma 2 internals, which differ "
            f"between major versions. Install a tested one: {INSTALL_TESTED}"
        )


check_versions()
