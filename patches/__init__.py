"""Model-specific glue for fastgemma. Each module here patches one model family.

Installed as ``fastgemma.patches``: the repository keeps this folder at its top level, and
pyproject.toml maps it into the package ([tool.setuptools] package-dir), for wheels and editable
installs alike. Import it as ``fastgemma.patches``; the modules here import fastgemma absolutely.

A patcher module provides: NAME, matches(model), patch(model, options) (options: a fastgemma.PatchOptions),
unpatch(model), is_patched(model), graph_lengths(model) and self_check() (stock against patched on a tiny
model: a list of disagreements, run by fastgemma.self_check before patching on untested versions). It keeps
what is specific to its model family (forwards, what is fusable, the patch wiring) and builds on fastgemma's
public names for the rest: fastgemma.patching, regions, graph_policy, mask_mapping, hf_layers, ops.
"""

from . import gemma2

PATCHERS = (gemma2,)


def find_patcher(model):
    """The patcher module for `model`, or None."""
    for patcher in PATCHERS:
        if patcher.matches(model):
            return patcher
    return None
