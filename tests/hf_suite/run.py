"""Hugging Face's own Gemma 2 tests, run stock and with every Gemma 2 model patched by fastgemma.

Runs transformers' tests/models/gemma2/test_modeling_gemma2.py (CPU, offline; slow, GPU and Hub tests
skip themselves) twice with the Python that runs this script: stock, then with conftest.py's plugin,
which passes every Gemma 2 model the tests build through `fastgemma.patch_model(model, backend="auto")`.
Prints both runs' counts and the tests that pass stock but fail patched. Pass = none do (exit status 0).

    python tests/hf_suite/run.py --hf-checkout PATH/TO/transformers [-- EXTRA PYTEST ARGS]

Test files: the top-level tests/test_*.py mixins from the installed version's sdist (pip download), the
rest from the transformers checkout (a work tree, or a git directory at --hf-ref, default tag
v<version>; $HF_CHECKOUT works too), best at the same version. All is assembled under --work (default:
a new temporary folder), where both runs' outcomes (JSON) and logs stay.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEST_FILE = "tests/models/gemma2/test_modeling_gemma2.py"
# What the Gemma 2 tests import from a transformers checkout (the sdist has only the top-level mixins).
REQUIRED = ["tests/__init__.py", "tests/causal_lm_tester.py", "tests/models/__init__.py", TEST_FILE]
OPTIONAL = ["conftest.py", "tests/models/gemma2", "tests/generation", "tests/utils", "tests/exporters",
            "tests/fixtures", "utils/test_module"]
# Imported by the tests, not dependencies of transformers: (module, pip distribution).
TEST_DEPENDENCIES = [("parameterized", "parameterized"), ("httpx", "httpx"), ("httpcore", "httpcore"),
                     ("h11", "h11"), ("anyio", "anyio"), ("sniffio", "sniffio"), ("idna", "idna"),
                     ("certifi", "certifi")]


def run(cmd, **kwargs):
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def copy_from_checkout(checkout: Path, ref: str | None, version: str, dest: Path) -> str:
    """Copy the checkout's test files into dest; returns a description of what was used."""
    if is_git_dir(checkout):
        git = ["git", "--git-dir", str(checkout)]
        if ref is None:
            ref = f"v{version}"
            if subprocess.run(git + ["rev-parse", "-q", "--verify", f"refs/tags/{ref}"], capture_output=True).returncode:
                sys.exit(f"{checkout} has no tag {ref}; name a commit with --hf-ref")
        listed = run(git + ["ls-tree", "-r", "--name-only", ref, "--", "conftest.py", "tests", "utils/test_module"],
                     capture_output=True).stdout.split()
        wanted = [p for p in listed if p in REQUIRED or any(p == o or p.startswith(o + "/") for o in OPTIONAL)
                  or (p.startswith("tests/") and p.count("/") == 1 and p.endswith(".py"))]
        archive = subprocess.run(git + ["archive", "--format=tar", ref, "--"] + wanted, check=True, capture_output=True)
        subprocess.run(["tar", "x", "-C", str(dest)], input=archive.stdout, check=True)
        commit = run(git + ["rev-parse", "--short", ref], capture_output=True).stdout.strip()
        return f"{checkout} at {ref} ({commit})"
    if not (checkout / "tests").is_dir():
        sys.exit(f"{checkout} is neither a transformers work tree nor a git directory")
    for path in REQUIRED + OPTIONAL + [str(p.relative_to(checkout)) for p in (checkout / "tests").glob("*.py")]:
        source = checkout / path
        if source.is_dir():
            shutil.copytree(source, dest / path, dirs_exist_ok=True)
        elif source.is_file():
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / path)
    described = subprocess.run(["git", "-C", str(checkout), "describe", "--tags", "--always", "--dirty"],
                               capture_output=True, text=True).stdout.strip()
    return f"{checkout}" + (f" ({described})" if described else " (not a git work tree)")


def copy_from_sdist(version: str, work: Path, dest: Path) -> list[str]:
    """Overlay the installed version's own top-level test mixins (tests/*.py of its sdist)."""
    sdist_dir = work / "sdist"
    sdists = list(sdist_dir.glob(f"transformers-{version}.tar.gz"))
    if not sdists:
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "-d", str(sdist_dir)])
        sdists = list(sdist_dir.glob(f"transformers-{version}.tar.gz"))
    copied = []
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                (dest / "tests" / parts[2]).write_bytes(tar.extractfile(member).read())
                copied.append(parts[2])
            elif member.isfile() and parts[1:] == ("pyproject.toml",):
                (work / "sdist-pyproject.toml").write_bytes(tar.extractfile(member).read())
    return copied


def stub_missing_exporters(dest: Path) -> str:
    """Newer sdists' test_modeling_common imports tests/exporters, which an older checkout lacks: an empty
    ExportTesterMixin then leaves the export tests out of both runs alike. Returns a note, or "" if not needed."""
    common = dest / "tests" / "test_modeling_common.py"
    if "from .exporters.test_export import" not in common.read_text() or (dest / "tests/exporters").exists():
        return ""
    (dest / "tests/exporters").mkdir()
    (dest / "tests/exporters/__init__.py").write_text("")
    (dest / "tests/exporters/test_export.py").write_text("class ExportTesterMixin:\n    pass\n")
    return "export tests left out (the checkout has no tests/exporters)"


def write_pytest_ini(work: Path, dest: Path):
    """transformers' pytest markers, without the rest of its pytest settings (doctests, log_cli, pytest-env)."""
    markers = []
    try:
        import tomllib
    except ImportError:  # Python 3.10: unregistered markers only warn
        tomllib = None
    if tomllib is not None and (work / "sdist-pyproject.toml").exists():
        settings = tomllib.loads((work / "sdist-pyproject.toml").read_text())
        markers = settings.get("tool", {}).get("pytest", {}).get("ini_options", {}).get("markers", [])
    lines = ["[pytest]", "markers ="] + [f"    {m}" for m in markers]
    lines += ["    torch_export_test: export tests", "    onnx_export_test: export tests",
              "    executorch_export_test: export tests", "    timeout: per-test time limit (pytest-timeout)"]
    (dest / "pytest.ini").write_text("\n".join(lines) + "\n")


def install_test_dependencies(work: Path) -> Path:
    deps = work / "deps"
    missing = [(module, dist) for module, dist in TEST_DEPENDENCIES if importlib.util.find_spec(module) is None]
    to_install = [dist for module, dist in missing if not (deps / module).exists()]
    if to_install:
        print(f"installing test-only packages into {deps}: {' '.join(to_install)}", flush=True)
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(deps)] + to_install)
    return deps


def prepare(args) -> tuple[Path, dict]:
    version = importlib.metadata.version("transformers")
    work = Path(args.work or tempfile.mkdtemp(prefix="fastgemma-hf-suite-")).resolve()
    dest = work / "transformers"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    source = copy_from_checkout(Path(args.hf_checkout).expanduser().resolve(), args.hf_ref, version, dest)
    missing = [p for p in REQUIRED if not (dest / p).exists()]
    if missing:
        sys.exit(f"the checkout lacks {', '.join(missing)}")
    copy_from_sdist(version, work, dest)
    left_out = stub_missing_exporters(dest)
    write_pytest_ini(work, dest)
    plugin = dest / "tests/models/gemma2/conftest.py"
    if plugin.exists():
        sys.exit(f"{plugin} exists in the checkout; run.py needs that name for its plugin")
    shutil.copy2(HERE / "conftest.py", plugin)
    # tests/test_pipeline_mixin.py imports <repo>/src/transformers by path: point it at the installed package.
    import transformers

    (dest / "src").mkdir()
    (dest / "src" / "transformers").symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
    deps = install_test_dependencies(work)
    import torch

    fastgemma_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                   capture_output=True, text=True).stdout.strip()
    info = {"work": work, "dest": dest, "deps": deps, "transformers": version, "torch": torch.__version__,
            "source": source + (f"; {left_out}" if left_out else ""), "fastgemma": fastgemma_rev}
    return dest, info


def run_pass(name: str, patched: bool, info: dict, extra: list[str]) -> dict:
    dest, work = info["dest"], info["work"]
    results = work / f"{name}.json"
    results.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update({
        "FASTGEMMA_HF_SUITE_PATCH": "1" if patched else "0",
        "FASTGEMMA_HF_SUITE_RESULTS": str(results),
        "PYTHONPATH": os.pathsep.join([str(info["deps"]), str(REPO)]),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",  # CPU tests only, also on a GPU machine
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.pop("RUN_SLOW", None)
    cmd = [sys.executable, "-m", "pytest", TEST_FILE, "-c", "pytest.ini", "--rootdir", str(dest),
           "-p", "no:cacheprovider", "-q", "-rN", "--tb=short"] + extra
    start = time.monotonic()
    with open(work / f"{name}.log", "w") as log:
        print(f"[{name}] pytest {' '.join(cmd[3:])}  (log: {work / f'{name}.log'})", flush=True)
        code = subprocess.run(cmd, cwd=dest, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - start
    if not results.exists():
        print((work / f"{name}.log").read_text()[-3000:])
        sys.exit(2)
    return {"results": {test: tuple(v) for test, v in json.loads(results.read_text()).items()},
            "code": code, "seconds": seconds}


def counts(results: dict) -> dict:
    out = {"passed": 0, "failed": 0, "skipped": 0}
    for outcome, _ in results.values():
        out[outcome] += 1
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-checkout", default=os.environ.get("HF_CHECKOUT"),
                        help="transformers work tree or git directory (default: $HF_CHECKOUT)")
    parser.add_argument("--hf-ref", help="commit or tag when --hf-checkout is a git directory (default: v<version>)")
    parser.add_argument("--work", help="folder to assemble and run in (default: a new temporary folder)")
    parser.add_argument("--only", choices=["stock", "patched"], help="run one pass only")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments for both runs (after --)")
    args = parser.parse_args(argv)
    if not args.hf_checkout:
        parser.error("give --hf-checkout (or set $HF_CHECKOUT)")

    _, info = prepare(args)
    print(f"transformers {info['transformers']} (tests: sdist + {info['source']}), torch {info['torch']}, "
          f"fastgemma {info['fastgemma']}; work folder {info['work']}", flush=True)
    passes = {}
    for name in ("stock", "patched"):
        if args.only in (None, name):
            passes[name] = run_pass(name, name == "patched", info, args.pytest_args)

    print(f"\n{'run':8} {'passed':>7} {'failed':>7} {'skipped':>8} {'minutes':>8}")
    for name, result in passes.items():
        c = counts(result["results"])
        print(f"{name:8} {c['passed']:7d} {c['failed']:7d} {c['skipped']:8d} {result['seconds'] / 60:8.1f}")
    empty = [name for name, result in passes.items() if not result["results"]]
    if empty:  # a collection error, or a filter that matched nothing: no comparison was made
        for name in empty:
            print(f"\nthe {name} run ran no test (pytest exit {passes[name]['code']}); its log ends:\n"
                  + (info["work"] / f"{name}.log").read_text()[-2000:])
        return 2
    if len(passes) < 2:
        return 0
    stock, patched = passes["stock"]["results"], passes["patched"]["results"]
    regressions = sorted(t for t, (o, _) in stock.items() if o == "passed" and patched.get(t, ("missing",))[0] != "passed")
    fixed = sorted(t for t, (o, _) in stock.items() if o == "failed" and patched.get(t, ("",))[0] == "passed")
    print(f"\nPass stock, fail patched: {len(regressions)}")
    for test in regressions:
        outcome, message = patched.get(test, ("missing from the patched run", ""))
        first = " ".join(message.split())[:150]
        print(f"  {test.split('::', 1)[1]:60} {outcome if outcome != 'failed' else ''}{first}")
    if fixed:
        print(f"Fail stock, pass patched: {len(fixed)}: {', '.join(t.split('::', 1)[1] for t in fixed)}")
    print(f"(outcomes: {info['work']}/{{stock,patched}}.json; tracebacks: {info['work']}/patched.log)")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
