"""PNG of the model suite: tokens/s and peak memory against sequence length, one line per contender."""

from __future__ import annotations

import os


def plot_model_suite(rows: list[dict], path: str, env: dict | None = None) -> bool:
    """Draw the plot; returns False (and draws nothing) when matplotlib is missing or no row is ok."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
    if not ok:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        print("[bench] matplotlib not available: no plot", flush=True)
        return False

    models = sorted({r["model"] for r in ok}, key=lambda m: [r["model"] for r in rows].index(m))
    contenders = []
    for r in rows:
        if r["contender"] not in contenders:
            contenders.append(r["contender"])
    markers = {"hf-eager": "o", "hf-flex": "s", "liger": "^", "fastgemma": "D", "fastgemma-attn": "d", "fastgemma-graphs": "X"}
    colors = {"hf-eager": "tab:blue", "hf-flex": "tab:orange", "liger": "tab:green", "fastgemma": "tab:red", "fastgemma-attn": "tab:purple", "fastgemma-graphs": "tab:pink"}
    styles = ["-", "--", ":", "-."]

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for mi, model in enumerate(models):
        for c in contenders:
            pts = sorted((r["seq"], r["tokens_per_s"], r.get("peak_mib"), r["batch"])
                         for r in ok if r["model"] == model and r["contender"] == c)
            if not pts:
                continue
            label = f"{model} {next((r.get('label') for r in ok if r['contender'] == c), c)}"
            xs = [p[0] for p in pts]
            kw = dict(marker=markers.get(c, "x"), color=colors.get(c), linestyle=styles[mi % len(styles)], label=label)
            ax_t.plot(xs, [p[1] for p in pts], **kw)
            if all(p[2] is not None for p in pts):
                ax_m.plot(xs, [p[2] / 1024 for p in pts], **kw)
    ticks = sorted({(r["seq"], r["batch"]) for r in ok})
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks([t[0] for t in ticks])
        ax.set_xticklabels([f"{t[1]}×{t[0]}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch × sequence length")
        ax.grid(True, alpha=0.3)
    ax_t.set_ylabel("tokens / s (fwd+bwd)")
    ax_t.set_title("throughput")
    ax_m.set_ylabel("peak allocated (GiB)")
    ax_m.set_title("peak memory")
    ax_t.legend(fontsize=7)
    title = "Gemma 2 + LoRA r16, gradient checkpointing"
    if env:
        title += f" — {env.get('gpu', '')}, {env.get('date', '')}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
