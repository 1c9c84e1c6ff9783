"""The layers of the house: the model-agnostic core (fastgemma/) never imports the glue, the recipes or the
benchmarks, and the glue (patches/) reaches the core through public names only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p for p in (ROOT / "fastgemma").rglob("*.py") if "patches" not in p.relative_to(ROOT).parts[1:])
GLUE = sorted((ROOT / "patches").glob("*.py"))
OUTSIDE_THE_CORE = ("recipes", "benchmarks", "patches")


def imported_modules(tree: ast.AST, package: str) -> set:
    """Absolute names of every module `tree` imports (relative imports resolved against `package`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_no_glue_recipe_or_benchmark(path):
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = imported_modules(ast.parse(path.read_text()), package)
    if path == ROOT / "fastgemma" / "api.py":  # the one door to the glue: the patcher registry
        found -= {"fastgemma.patches", "fastgemma.patches.PATCHERS", "fastgemma.patches.find_patcher",
                  "patches", "patches.PATCHERS", "patches.find_patcher"}
    bad = sorted(name for name in found
                 if name.split(".")[0] in OUTSIDE_THE_CORE or name.startswith("fastgemma.patches"))
    assert not bad, f"{path.name} imports {bad}"


def private_uses_of_the_core(tree: ast.AST) -> list:
    """Underscore names the glue imports from fastgemma modules, or reads off a fastgemma module it imported."""
    modules, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastgemma") and not node.level:
            bad += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            modules.update(a.asname or a.name for a in node.names if not a.name[:1].isupper())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastgemma"):
                    bad += [alias.name] if any(part.startswith("_") for part in alias.name.split(".")) else []
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                bad.append(ast.unparse(node))
    return bad


def private_names_defined_in(trees) -> set:
    """Underscore names (not dunders) that the core defines: functions, methods, class fields, ``self._x``."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def private_members_used(tree: ast.AST, private: set) -> list:
    """`obj._x` reads and ``_x=`` keywords in `tree` whose name is one of the core's private names
    (e.g. ``mask._segments``: a private member of a core object)."""
    used = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in private]
    used += [node.arg for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg in private]
    return sorted(used)


CORE_PRIVATE = private_names_defined_in(ast.parse(path.read_text()) for path in CORE)


@pytest.mark.parametrize("path", GLUE, ids=lambda p: p.name)
def test_the_glue_uses_only_public_names_of_the_core(path):
    tree = ast.parse(path.read_text())
    bad = private_uses_of_the_core(tree) + private_members_used(tree, CORE_PRIVATE)
    assert not bad, f"{path.name} uses private names of fastgemma: {bad}"


def test_the_check_finds_what_it_looks_for():
    sample = ast.parse("from fastgemma.attention import _RECOMPILE_LIMIT_KEY, softcap_attention\n"
                       "import fastgemma.graphs as graphs\n"
                       "from fastgemma import masks\n"
                       "x = graphs.GraphedLayers._lengths\n"
                       "y = masks.AttentionMask._segments\n"
                       "z = module._fastgemma_state\n")
    assert private_uses_of_the_core(sample) == ["fastgemma.attention._RECOMPILE_LIMIT_KEY",
                                                "graphs.GraphedLayers._lengths", "masks.AttentionMask._segments"]
    members = ast.parse("ids = mask._segments(device, 128)\n"
                        "AttentionMask(8, 8, _block_mask=block)\n"
                        "n = config._attn_implementation\n")
    assert private_members_used(members, CORE_PRIVATE) == ["_block_mask", "_segments"]
    assert imported_modules(ast.parse("from ..patches import gemma2"), "fastgemma.ops") == \
        {"fastgemma.patches", "fastgemma.patches.gemma2"}


@pytest.mark.parametrize("path", CORE + GLUE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_of_the_core_or_the_glue_outgrows_600_lines(path):
    assert len(path.read_text().splitlines()) <= 600
