"""Rewrite a wheel without the native libraries one machine does not load, to fit the GPU machine's carry.

bitsandbytes 0.50.2's wheel is 43 MB, nearly all of it one CUDA library per toolkit (11.8 to 13.2, and ROCm),
of which a machine loads only the one matching torch's CUDA (13.0 for the GPU image's torch 2.11+cu130). The
64 MiB carry then has no room for `.whl-hf` and `.wu` beside it. This keeps the files matching ``--keep`` among
the dropped kind and rewrites RECORD to match, so pip installs the result as usual:

    python3 -m benchmarks.slim_wheel .whl/bitsandbytes-*.whl --drop 'libbitsandbytes_*.so' \
        --keep 'libbitsandbytes_cuda130.so'

The wheel is replaced in place (same name). A machine whose torch needs another library then fails at import
with bitsandbytes' own error naming the library it looked for.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
import zipfile


def _file_name(member: str) -> str:
    return member.rsplit("/", 1)[-1]


def slim(path: str, drop: str, keep: list[str]) -> tuple[int, int, list[str]]:
    """Rewrite the wheel at `path` without members whose file name matches `drop` but none of `keep`.
    Returns (bytes before, bytes after, names dropped)."""
    before = os.path.getsize(path)
    with zipfile.ZipFile(path) as source:
        matching = [n for n in source.namelist() if fnmatch.fnmatch(_file_name(n), drop)]
        kept = [n for n in matching if any(fnmatch.fnmatch(_file_name(n), k) for k in keep)]
        gone = [n for n in matching if n not in kept]
        if not gone:
            return before, before, []
        if not kept:
            raise SystemExit(f"{path}: --keep {keep} matches no member; refusing to drop every {drop!r}")
        gone_set = set(gone)
        handle, temporary = tempfile.mkstemp(suffix=".whl", dir=os.path.dirname(os.path.abspath(path)))
        os.close(handle)
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename in gone_set:
                    continue
                data = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in gone_set).encode()
                target.writestr(info, data)
    os.replace(temporary, path)
    return before, os.path.getsize(path), gone


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheel")
    p.add_argument("--drop", required=True, help="file-name pattern of the members to drop, e.g. 'lib*_cuda*.so'")
    p.add_argument("--keep", action="append", default=[], help="file-name pattern kept although --drop matches")
    args = p.parse_args(argv)
    before, after, gone = slim(args.wheel, args.drop, args.keep)
    print(f"{args.wheel}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB, dropped {len(gone)}: "
          + ", ".join(n.rsplit('/', 1)[-1] for n in gone))
    return 0


if __name__ == "__main__":
    sys.exit(main())
