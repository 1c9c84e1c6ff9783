"""Model-specific glue for fastgemma. Each module here patches one model family.

A patcher module provides: NAME, matches(model), patch(model, max_seq_length, backend, fused_ops),
unpatch(model) and is_patched(model).
"""

from . import gemma2

PATCHERS = (gemma2,)


def find_patcher(model):
    """The patcher module for `model`, or None."""
    for patcher in PATCHERS:
        if patcher.matches(model):
            return patcher
    return None
