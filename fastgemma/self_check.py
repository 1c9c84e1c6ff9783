"""Never silently wrong on a version nobody tested: ``patch_model`` checks itself first.

When the installed torch or transformers is outside the tested ranges (``fastgemma.versions``), the
first ``patch_model`` call of the process asks the model's patcher to compare stock and patched on a
tiny random model on the CPU (its ``self_check()``: a list of disagreements, empty when exact). One
disagreement, or an error inside the check, and fastgemma refuses to patch with ``UntestedVersionError``;
setting the environment variable ``FASTGEMMA_ALLOW_UNTESTED=1`` patches anyway, with a warning. When the
check passes, one warning line says which versions were checked.
"""

from __future__ import annotations

import logging
import os
import time

from . import versions

logger = logging.getLogger("fastgemma")

ALLOW_UNTESTED = "FASTGEMMA_ALLOW_UNTESTED"

_verdicts: dict = {}  # (patcher name, versions checked) -> list of disagreements


class UntestedVersionError(RuntimeError):
    """The installed torch / transformers is outside the tested range, and the patch is not exact there."""


def ensure_exact(patcher) -> None:
    """Return quietly on tested versions or after a passing check; raise UntestedVersionError otherwise."""
    untested = versions.untested_versions()
    if not untested:
        return
    found = ", ".join(f"{package} {version} (tested {versions.tested_range(package)})"
                      for package, version in untested.items())
    key = (patcher.NAME, tuple(sorted(untested.items())))
    first_time = key not in _verdicts
    if first_time:
        started = time.perf_counter()
        try:
            problems = patcher.self_check()
        except Exception as error:  # internals moved so far that the check itself breaks
            problems = [f"the check raised {type(error).__name__}: {error}"]
        _verdicts[key] = problems
        if not problems:
            logger.warning("fastgemma: %s: untested; self-check passed in %.1f s (stock and patched %s agree on "
                           "prefill, cached decoding and a training step)", found, time.perf_counter() - started,
                           patcher.NAME)
    problems = _verdicts[key]
    if not problems:
        return
    install = " and ".join(versions.install_command(package) for package in untested)
    message = (f"fastgemma: {found}: patched {patcher.NAME} differs from stock there: {problems[0]}"
               + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
               + f". Install a tested version: {install}")
    if os.environ.get(ALLOW_UNTESTED) == "1":
        if first_time:
            logger.warning("%s. Patching anyway, because %s=1.", message, ALLOW_UNTESTED)
        return
    raise UntestedVersionError(f"{message} (or set {ALLOW_UNTESTED}=1 to patch anyway).")
