"""What the terminal shows: fastgemma's one line, known third-party noise filtered, quiet library
loggers and progress bars where the recipe speaks for them, short paths, the resume command.
Standard library only at module level."""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import warnings
from pathlib import Path


def display_path(path: str | Path) -> str:
    """Relative to the current directory when inside it: shorter, and the same on every machine."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)



@contextlib.contextmanager
def quiet_logger(name: str):
    """Silence a library's logger for a moment: its failures arrive as exceptions, which the
    recipe reports once, on one line (datasets also logs them, and with a root handler, twice)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)



@contextlib.contextmanager
def transformers_progress_bars_off():
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


class DropMessages(logging.Filter):
    """Drop a library's log records that start with one of the given texts."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# Third-party log lines that mislead here, by logger. Everything else stays visible.
KNOWN_NOISE = {
    # Logged whenever bitsandbytes is imported on a CPU with AVX512-BF16 (peft imports it), even
    # when nothing is 4-bit. It names an optional faster kernel, not a failure: 4-bit still works.
    "bitsandbytes.backends.cpu.ops": DropMessages("Failed to load CPU gemm_4bit_forward"),
    # Checkpoints saved within the same second (--save-steps 1, or Ctrl-C right after a save)
    # have equal mtimes; the Trainer then orders them by step, which is what we want anyway.
    "transformers.trainer_utils": DropMessages("mtime may not be reliable on this filesystem"),
    # transformers >= 5.24 looks for a hub kernel of bitsandbytes' 4-bit ops; offline, the kernels package
    # says it skipped a check nobody asked for (the recipe's own offline errors say what matters).
    "kernels._internals.hf_hub": DropMessages("Skipping publisher trust check"),
}


@contextlib.contextmanager
def console_settings():
    """A readable console for the duration of the run (undone afterwards, for in-process callers):
    fastgemma's one line on what it patched, known third-party noise filtered."""
    fastgemma_logger = logging.getLogger("fastgemma")
    saved = fastgemma_logger.level, fastgemma_logger.propagate
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    # A handler on fastgemma's logger only: a root handler (basicConfig) would print the
    # libraries' own log lines a second time.
    fastgemma_logger.addHandler(handler)
    fastgemma_logger.setLevel(logging.INFO)
    fastgemma_logger.propagate = False
    for name, noise in KNOWN_NOISE.items():
        logging.getLogger(name).addFilter(noise)
    datasets_bars_were_on = "datasets" not in sys.modules or sys.modules["datasets"].is_progress_bar_enabled()
    try:
        with warnings.catch_warnings():
            # Upstream renames the user cannot act on (gradient -> activation checkpointing inside TRL/peft).
            renamed = r".*deprecated and will be removed in v6.*"
            warnings.filterwarnings("ignore", message=renamed, category=FutureWarning)
            yield
    finally:
        fastgemma_logger.removeHandler(handler)
        fastgemma_logger.setLevel(saved[0])
        fastgemma_logger.propagate = saved[1]
        for name, noise in KNOWN_NOISE.items():
            logging.getLogger(name).removeFilter(noise)
        if datasets_bars_were_on and "datasets" in sys.modules:
            sys.modules["datasets"].enable_progress_bars()


def resume_command(script: str, argv: list[str]) -> str:
    """This run's command line with --resume (replacing any earlier --resume, and without --overwrite)."""
    kept, skip_value = [], False
    for index, arg in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        if arg.startswith("--resume=") or arg == "--overwrite":  # continuing must not delete what it continues
            continue
        if arg == "--resume":
            skip_value = index + 1 < len(argv) and not argv[index + 1].startswith("-")
            continue
        kept.append(arg)
    return shlex.join(["python", display_path(script), *kept, "--resume"])
