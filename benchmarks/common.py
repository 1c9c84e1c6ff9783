"""Shared pieces of the benchmark harness: shapes, timing, memory, error classification, tables.

Nothing here imports fastgemma, Liger, TRL or bitsandbytes at module import time: every optional
dependency is imported inside the suite that needs it, so a missing package turns into an
"n/a" row instead of a crash.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from fastgemma.patches.gemma2_shapes import PUBLISHED_SHAPES, SHARED_FIELDS

# --------------------------------------------------------------------------------------------------
# Gemma 2 shapes (published configs of google/gemma-2-{2b,9b,27b}); "tiny" is the CPU smoke shape.
# --------------------------------------------------------------------------------------------------

GEMMA2_SHAPES: dict[str, dict[str, Any]] = {
    **PUBLISHED_SHAPES,
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        query_pre_attn_scalar=16,
        vocab_size=512,
        sliding_window=32,
    ),
}

COMMON_GEMMA2 = SHARED_FIELDS

# Token ids 0..3 are reserved for <pad>, <eos>, <bos>, <unk> of the offline tokenizer; random data
# never uses them so "real tokens" can be counted without ambiguity.
FIRST_TEXT_TOKEN = 4


def gemma2_config(name: str, max_position_embeddings: int = 8192, attn_implementation: str | None = None):
    """A transformers Gemma2Config with the published shapes of ``name`` (2b, 9b, 27b, tiny)."""
    from transformers import Gemma2Config

    shape = dict(GEMMA2_SHAPES[name])
    kw = dict(COMMON_GEMMA2)
    kw.update(shape)
    kw["max_position_embeddings"] = max(8192, int(max_position_embeddings))
    n = shape["num_hidden_layers"]
    kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    cfg = Gemma2Config(**kw)
    cfg.use_cache = False
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cfg


def attn_scale(name: str) -> float:
    return GEMMA2_SHAPES[name]["query_pre_attn_scalar"] ** -0.5


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------

LABELS = {
    "hf-eager": "HF eager",
    "hf-flex": "HF flex_attention",
    "liger": "Liger (on eager)",
    "fastgemma": "fastgemma (defaults)",
    "fastgemma-ops": "fastgemma, op by op (cuda_graphs=False)",
    "fastgemma-attn": "fastgemma, attention only",
    "fastgemma-graphs": "fastgemma, CUDA-graphed layers",
    "fastgemma-flash": "fastgemma, FlashAttention 4 under flex",
    "fastgemma-checkpoint-all": "fastgemma, every layer checkpointed (memory_budget=None)",
    "fastgemma-offload": "fastgemma, checkpointed inputs offloaded to CPU",
    "fastgemma-dequantized": "fastgemma, graphed steps on dequantised 4-bit weights",
    "unsloth": "Unsloth",
    "unsloth-nocompile": "Unsloth, no block compile",
}
BASELINES = ("hf-eager", "hf-flex")


def pick(value, tiny: bool, tiny_default, gpu_default):
    """A CLI value if given, else the suite's default for --tiny or for the real run."""
    if value is not None:
        return value
    return tiny_default if tiny else gpu_default


def parse_list(text: str | None, default: Iterable[str]) -> list[str]:
    if text is None or text.strip() == "":
        return list(default)
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_int_list(text: str | None, default: Iterable[int]) -> list[int]:
    if text is None or text.strip() == "":
        return list(default)
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if not t:
            continue
        mult = 1
        if t.endswith("k"):
            mult, t = 1024, t[:-1]
        out.append(int(float(t) * mult))
    return out


# --------------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------------


def log(*args: Any) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}]", *args, flush=True)


def pick_device(tiny: bool, force_cpu: bool = False) -> torch.device:
    if not force_cpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer_name(device: torch.device) -> str:
    return "CUDA events" if device.type == "cuda" else "time.perf_counter (CPU)"


class Timer:
    """Times a region with CUDA events on a GPU and ``perf_counter`` on CPU. ``ms`` after ``stop``."""

    def __init__(self, device: torch.device):
        self.device = device
        self._t0 = 0.0
        self._elapsed: float | None = None
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> "Timer":
        if self.device.type == "cuda":
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def stop(self) -> "Timer":
        if self.device.type == "cuda":
            self._end.record()
        else:
            self._elapsed = (time.perf_counter() - self._t0) * 1e3
        return self

    @property
    def ms(self) -> float:
        if self.device.type == "cuda":
            self._end.synchronize()
            return float(self._start.elapsed_time(self._end))
        assert self._elapsed is not None
        return self._elapsed


def free_memory(device: torch.device | None = None) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return None


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _exc_chain(exc: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_oom(exc: BaseException) -> bool:
    for e in _exc_chain(exc):
        if isinstance(e, torch.OutOfMemoryError):
            return True
        msg = str(e).lower()
        if "out of memory" in msg or "cuda_error_out_of_memory" in msg or "cublas_status_alloc_failed" in msg:
            return True
    return False


def describe_failure(exc: BaseException, limit: int = 160) -> str:
    if is_oom(exc):
        return "OOM"
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"failed ({msg})"


def run_guarded(fn: Callable[[], Any], what: str) -> tuple[str, Any]:
    """Call ``fn``; return ("ok", value) or (status, None) with status "OOM" / "failed (...)".

    The exception (and with it every tensor its traceback frames hold) is dropped before returning,
    and memory is freed, so an OOM in one contender does not poison the next.
    """
    status, value = "ok", None
    try:
        value = fn()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - report everything, stop nothing
        status = describe_failure(exc)
        if status != "OOM" or os.environ.get("BENCH_TRACEBACK"):
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            log(f"{what}: {status}\n{tb[-4000:]}")
        else:  # the allocator's first line says what was asked for and what was free
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            log(f"{what}: OOM ({first})")
        exc = None  # noqa: F841 - release frames
    if status != "ok":
        sys.last_traceback = None
        free_memory()
    return status, value


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(statistics.median(xs)) if xs else None


def raise_recompile_limits(limit: int = 512) -> None:
    """Let torch.compile keep a graph per shape/mask seen in a suite instead of falling back to eager.

    Both HF's and fastgemma's flex_attention wrappers compile the same function, so the default limit
    (8 recompiles per code object) would be hit after a few sequence lengths and masks, and the later
    configurations would silently run flex_attention unfused. Warm-up steps absorb every recompile.
    """
    try:
        import torch._dynamo.config as dc
    except Exception:  # pragma: no cover
        return
    for name in ("recompile_limit", "cache_size_limit"):
        try:
            if getattr(dc, name) < limit:
                setattr(dc, name, limit)
        except Exception:  # noqa: BLE001 - the name differs between torch versions
            pass
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        try:
            if getattr(dc, name) < 4 * limit:
                setattr(dc, name, 4 * limit)
        except Exception:  # noqa: BLE001
            pass


class Budget:
    """Wall-clock budget of a suite; ``expired()`` once it is spent."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def left(self) -> float:
        if not self.seconds:
            return float("inf")
        return self.seconds - (time.perf_counter() - self.t0)

    def expired(self) -> bool:
        return self.left() <= 0


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModuleGuard:
    """Snapshot module globals and class attributes and put them back afterwards.

    Liger (and possibly other patchers) replace ``modeling_gemma2.Gemma2RMSNorm`` & co at module
    level, which would leak into every model built later in the same process. Each contender runs
    inside a guard so the next contender starts from stock transformers.
    """

    def __init__(self, *modules: Any):
        self.modules = [m for m in modules if m is not None]
        self._globals: list[tuple[Any, dict]] = []
        self._classes: list[tuple[type, dict]] = []

    def __enter__(self) -> "ModuleGuard":
        for mod in self.modules:
            snap = dict(vars(mod))
            self._globals.append((mod, snap))
            for value in snap.values():
                if isinstance(value, type) and getattr(value, "__module__", None) == mod.__name__:
                    self._classes.append((value, dict(value.__dict__)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, snap in self._classes:
            for key in list(cls.__dict__):
                if key not in snap:
                    with contextlib.suppress(Exception):
                        delattr(cls, key)
            for key, val in snap.items():
                if cls.__dict__.get(key, object()) is not val:
                    with contextlib.suppress(Exception):
                        setattr(cls, key, val)
        for mod, snap in self._globals:
            cur = vars(mod)
            for key in list(cur):
                if key not in snap:
                    del cur[key]
            for key, val in snap.items():
                if cur.get(key, object()) is not val:
                    cur[key] = val


def stock_guard() -> ModuleGuard:
    """Guard over the transformers modules a Gemma 2 patcher may touch."""
    import transformers.integrations.flex_attention as hf_flex
    import transformers.masking_utils as hf_masks
    import transformers.models.gemma2.modeling_gemma2 as modeling_gemma2

    mods = [modeling_gemma2, hf_flex, hf_masks]
    try:
        import transformers.loss.loss_utils as loss_utils

        mods.append(loss_utils)
    except Exception:  # pragma: no cover - layout differs between versions
        pass
    return ModuleGuard(*mods)


# --------------------------------------------------------------------------------------------------
# Environment / provenance
# --------------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except Exception:
        return "unknown"


def env_info(device: torch.device, argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv if argv is None else argv)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        gpu = f"none (CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    exe = os.path.basename(sys.executable or "python") or "python"
    cmd = f"{exe} -m benchmarks.run " + " ".join(_shell_quote(a) for a in argv[1:])
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": gpu,
        "cuda": torch.version.cuda or "n/a",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "liger_kernel": _version("liger-kernel"),
        "accelerate": _version("accelerate"),
        "fastgemma_git": git_revision(),
        "command": cmd,
    }


def _shell_quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if x != 0 and (abs(x) < 10 ** (-digits) or abs(x) >= 1e7):
            return f"{x:.2e}"
        return f"{x:,.{digits}f}"
    return str(x)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def ratio(row: dict, rows: list[dict], key_fields: tuple[str, ...], metric: str, baseline: str, higher_better: bool):
    """metric ratio of ``row`` against the ``baseline`` contender with the same key fields, same run."""
    if row.get("status") != "ok" or row.get(metric) is None:
        return None
    for other in rows:
        if other.get("contender") != baseline or other.get("status") != "ok" or other.get(metric) is None:
            continue
        if all(other.get(k) == row.get(k) for k in (*key_fields, "run")):
            a, b = row[metric], other[metric]
            if not a or not b:
                return None
            return (a / b) if higher_better else (b / a)
    return None


@dataclass
class SuiteResult:
    suite: str
    rows: list[dict] = field(default_factory=list)
    table: str = ""
    notes: list[str] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"suite": self.suite, "rows": self.rows, "notes": self.notes, "table": self.table}


def json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return str(o)
    if isinstance(o, torch.device):
        return str(o)
    return repr(o)


def write_json(path: str, payload: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=json_default)
    os.replace(tmp, path)
