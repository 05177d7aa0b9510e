"""The report's plots as PNG bytes: latency per artifact, kept width per layer, quality against ratio."""

from __future__ import annotations

import io


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_latency(data: dict) -> bytes | None:
    import matplotlib.pyplot as plt
    import numpy as np

    providers = [p for p in data["dense"]["latency"] if p in data["expert"]["latency"]]
    if not providers:
        return None
    fig, axes = plt.subplots(len(providers), 2, figsize=(10, 3.4 * len(providers)), squeeze=False)
    colours = {"dense": "#8c8c8c", "expert": "#1f77b4"}
    for row, provider in enumerate(providers):
        d, e = data["dense"]["latency"][provider], data["expert"]["latency"][provider]
        lengths = [n for n in d["prefill_ms"] if n in e["prefill_ms"]]
        x = np.arange(len(lengths))
        ax = axes[row][0]
        for k, (side, lat) in enumerate((("dense", d), ("expert", e))):
            values = [lat["prefill_ms"][n] for n in lengths]
            errors = [lat["prefill_p90_ms"][n] - lat["prefill_ms"][n] for n in lengths]
            ax.bar(x + (k - 0.5) * 0.38, values, 0.38, yerr=[[0] * len(values), errors], capsize=3,
                   label=side, color=colours[side])
        ax.set_xticks(x, [f"{n} tok" for n in lengths])
        ax.set_ylabel("prefill p50 (ms), bar to p90")
        ax.set_title(f"time to first token - {provider.replace('ExecutionProvider', '')}")
        ax.legend()
        ax = axes[row][1]
        sides = ["dense", "expert"]
        rates = [d["decode_tok_s"], e["decode_tok_s"]]
        bars = ax.bar(sides, rates, color=[colours[s] for s in sides])
        for bar, rate in zip(bars, rates):
            ax.annotate(f"{rate:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom")
        ax.set_ylim(0, max(rates) * 1.15)
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"decode throughput - {provider.replace('ExecutionProvider', '')}")
    fig.tight_layout()
    return _png(fig)


def plot_structure(data: dict) -> bytes | None:
    import matplotlib.pyplot as plt
    import numpy as np

    dense, expert = data["dense"].get("structure"), data["expert"].get("structure")
    if not dense or not expert:
        return None
    n = len(dense["intermediate_sizes"])
    layers = np.arange(n)
    kept_ffn, kept_q, kept_kv = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, src in enumerate(expert["source_layers"]):
        kept_ffn[src] = expert["intermediate_sizes"][i]
        kept_q[src] = expert["num_attention_heads"][i]
        kept_kv[src] = expert["num_key_value_heads"][i]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.bar(layers, dense["intermediate_sizes"], color="#d9d9d9", label="dense")
    ax1.bar(layers, kept_ffn, color="#1f77b4", label="expert (kept)")
    ax1.set_ylabel("FFN width")
    ax1.set_title("kept FFN channels per layer")
    ax1.set_ylim(0, max(dense["intermediate_sizes"]) * 1.3)  # headroom for the legend
    ax1.legend(loc="upper right", ncol=2)
    ax2.bar(layers - 0.2, dense["num_attention_heads"], 0.4, color="#d9d9d9", label="dense query heads")
    ax2.bar(layers - 0.2, kept_q, 0.4, color="#ff7f0e", label="kept query heads")
    ax2.bar(layers + 0.2, dense["num_key_value_heads"], 0.4, color="#eeeeee", label="dense KV heads")
    ax2.bar(layers + 0.2, kept_kv, 0.4, color="#2ca02c", label="kept KV heads")
    ax2.set_ylabel("heads")
    ax2.set_xlabel("layer (original index)")
    ax2.set_xticks(layers if n <= 32 else layers[::2])
    ax2.set_title("kept attention heads per layer")
    ax2.set_ylim(0, max(dense["num_attention_heads"]) * 1.45)
    ax2.legend(fontsize=8, ncol=4, loc="upper right")
    fig.tight_layout()
    return _png(fig)


def plot_quality(data: dict) -> bytes | None:
    import matplotlib.pyplot as plt

    points = data["quality_vs_ratio"]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, marker, name in (("ppl_retention", "o", "perplexity retention"), ("acc_retention", "s", "accuracy retention")):
        methods = sorted({p["method"] or "?" for p in points if p.get(key) is not None})
        for method in methods:
            pts = [p for p in points if (p["method"] or "?") == method and p.get(key) is not None]
            xs = [0.0] + [p["achieved_ratio"] for p in pts]
            ys = [1.0] + [p[key] for p in pts]
            ax.plot(xs, ys, marker=marker, label=f"{name} ({method})")
    ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle="--")
    ax.set_xlabel("achieved pruning ratio (share of prunable parameters removed)")
    ax.set_ylabel("retention vs dense (1.0 = no loss)")
    ax.set_title("held-out quality vs pruning ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
