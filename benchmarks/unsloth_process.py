"""The harness's side of a contender that runs in a process of its own (Unsloth: importing it patches
transformers, peft and trl for the whole process): that process's environment, running it under a time limit,
and reading back the one row it writes (benchmarks.unsloth_trl, benchmarks.unsloth_context).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading

from . import common as C
from . import models as M

UNSLOTH_TIMEOUT_S = 900.0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unsloth_env(cname: str, unsloth_path: str | None, base: dict | None = None) -> dict:
    """The Unsloth process's environment: ``unsloth_path`` (entries made absolute) then the repository root as
    its whole PYTHONPATH, this contender's UNSLOTH_* settings, and the Hub offline (the checkpoint is local).

    The parent's PYTHONPATH is not kept when ``unsloth_path`` is given: it may hold a transformers or trl that
    Unsloth refuses (on our GPU machine, /tmp/site has transformers 5.23; Unsloth 2026.10 needs ≤ 5.17). Without
    one, the parent's environment is kept, for an Unsloth installed next to everything else."""
    env = dict(os.environ if base is None else base)
    if unsloth_path:
        entries = [os.path.abspath(p) for p in unsloth_path.split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([*entries, REPO_ROOT])
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    for key, value in M.UNSLOTH[cname].items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_child(cmd: list[str], env: dict, out_path: str, timeout_s: float, label: str) -> dict:
    """Run the Unsloth process and return the row it wrote (at least a status), never raising.

    Its output is echoed line by line (prefixed with ``label``) and its last lines kept, to name the failure of
    a process that died without writing its row. It gets a process group of its own, so that a timeout ends it
    together with the compile workers it started."""
    tail: collections.deque[str] = collections.deque(maxlen=20)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)

    def echo():
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"[{label}] {line}", end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # Also after a normal exit: compile workers it left behind would hold the output pipe open.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone already
            pass
        proc.wait()
    reader.join(timeout=5)
    if timed_out:
        return {"status": f"failed (timeout: the Unsloth process ran past {timeout_s:g} s)"}
    try:
        with open(out_path) as f:
            row = json.load(f)
    except (OSError, ValueError):
        last = next((line for line in reversed(tail) if line.strip()), "no output")
        return {"status": f"failed (the Unsloth process exited with code {proc.returncode} without a row: "
                          f"{_one_line(last, 120)})"}
    row.setdefault("status", f"failed (the Unsloth process wrote a row without a status, exit code {proc.returncode})")
    return row


def run_unsloth_process(cname: str, cmd: list[str], out_path: str, args, extra_timeout_s: float = 0.0) -> dict:
    """Run an Unsloth contender's command (its suite builds it) in the contender's environment, under
    --unsloth-timeout-s plus `extra_timeout_s`: the row it wrote to out_path, or a failure status."""
    env = unsloth_env(cname, getattr(args, "unsloth_path", None))
    timeout_s = (getattr(args, "unsloth_timeout_s", None) or UNSLOTH_TIMEOUT_S) + extra_timeout_s
    C.log(f"{cname}: {' '.join(cmd)}  (PYTHONPATH={env['PYTHONPATH']})")
    return run_child(cmd, env, out_path, timeout_s, cname)


def unsloth_versions_note(rows: list[dict]) -> str | None:
    """What the Unsloth rows ran on: their process's versions differ from the header's (this process's)."""
    seen = []
    for r in rows:
        v = r.get("versions")
        if r.get("contender") in M.UNSLOTH and v:
            text = ", ".join(f"{k} {v[k]}" for k in v)
            if text not in seen:
                seen.append(text)
    return ("Unsloth rows ran on: " + "; ".join(seen) + ".") if seen else None
