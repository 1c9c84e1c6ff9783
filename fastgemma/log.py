"""Choices fastgemma logs once per process (logger "fastgemma"): a silent fallback is hard to find, a repeated
line every step is noise."""

from __future__ import annotations

import logging

logger = logging.getLogger("fastgemma")

said: set = set()  # the keys of the messages say_once has logged in this process


def say_once(key, level: int, message: str, *args) -> None:
    """Log `message % args` at `level` the first time `key` comes, and nothing after."""
    if key not in said:
        said.add(key)
        logger.log(level, message, *args)
