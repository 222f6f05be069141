"""Turn a bench result (dict) into the target verdicts, the markdown table, the PNG chart and the README section."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

PEERS = ("thox", "llama_server", "llama_cpp_python")
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
REPRODUCE = "make bench            # builds the peers once (cached in .cache/bench), runs, writes bench/results/"


def _get(d: Any, *path: Any) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def metric(result: dict[str, Any], server: str, name: str) -> float | None:
    """One headline number for one server, or None when it was not measured."""
    s = _get(result, "servers", server)
    if s is None:
        return None
    if name == "decode":
        return _get(s, "single_stream", "decode_tok_s_median")
    if name in ("prefill_short", "prefill_long"):
        return _get(s, name, "prefill_tok_s_median")
    if name == "ttft_p50":
        return _get(s, "prefill_short", "ttft_ms_p50")
    if name == "ttft_p95":
        return _get(s, "prefill_short", "ttft_ms_p95")
    if name.startswith("agg_"):
        return _get(s, "concurrency", name[4:], "aggregate_tok_s")
    if name.startswith("ttft95_"):
        return _get(s, "concurrency", name[7:], "ttft_ms_p95")
    if name == "rss":
        return _get(s, "memory", "peak_rss_mb")
    if name == "rss_end":
        return _get(s, "memory", "rss_end_mb")
    if name == "lag_p99":
        return _get(s, "event_loop", "lag_p99_ms")
    raise KeyError(name)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b not in (None, 0) else None


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: each with its value, the ratio it is judged on, and pass/fail (None: not measured)."""
    rows: list[dict[str, Any]] = []

    def vs(key: str, label: str, peer: str, minimum: float) -> None:
        ratio = _ratio(metric(result, "thox", key), metric(result, peer, key))
        rows.append(
            {
                "key": key,
                "target": label,
                "peer": peer,
                "ratio": ratio,
                "min_ratio": minimum,
                "pass": None if ratio is None else ratio >= minimum,
            }
        )

    def absolute(key: str, label: str, value: float | None, limit: float, upper: bool = True) -> None:
        ok = None if value is None else (value <= limit if upper else value >= limit)
        rows.append({"key": key, "target": label, "value": value, "limit": limit, "upper": upper, "pass": ok})

    vs("decode", "single-stream decode >= 1.0x llama-server", "llama_server", 1.0)
    vs("prefill_short", "prefill (~40 tokens) >= 1.5x llama-server", "llama_server", 1.5)
    vs("prefill_long", "prefill (~500 tokens) >= 1.5x llama-server", "llama_server", 1.5)
    vs("agg_16", "aggregate at 16 streams >= 3x llama-cpp-python", "llama_cpp_python", 3.0)
    vs("agg_16", "aggregate at 16 streams >= 1.0x llama-server --parallel 16", "llama_server", 1.0)
    absolute("ttft_p50", "TTFT p50 (~40-token prompt, 1 stream) <= 100 ms", metric(result, "thox", "ttft_p50"), 100)
    absolute(
        "top1", "top-1 agreement with llama.cpp >= 0.95", _get(result, "agreement", "top1_agreement"), 0.95, upper=False
    )
    absolute("lag_p99", "event-loop lag p99 during 16 streams <= 10 ms", metric(result, "thox", "lag_p99"), 10)
    absolute("rss", "agent + engine host peak RSS <= 600 MB (both models loaded)", metric(result, "thox", "rss"), 600)
    absolute(
        "cosine",
        "embedding cosine vs sentence-transformers >= 0.999 (min over inputs)",
        _get(result, "embeddings", "cosine_min"),
        0.999,
        upper=False,
    )
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "**FAIL**")


def markdown(result: dict[str, Any]) -> str:
    """The results table (and the embeddings table), as markdown."""
    targets = evaluate(result)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        by_key.setdefault(t["key"], []).append(t)

    def judged(key: str) -> tuple[str, str]:
        found = by_key.get(key, [])
        if not found:
            return "", ""
        texts, oks = [], []
        for t in found:
            if "ratio" in t:
                peer = "llama-server" if t["peer"] == "llama_server" else "llama-cpp-python"
                ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.2f}x"
                texts.append(f"{ratio} vs {peer} (target >= {t['min_ratio']}x)")
            else:
                sign = "<=" if t["upper"] else ">="
                texts.append(f"target {sign} {t['limit']}")
            oks.append(_verdict(t["pass"]))
        return "; ".join(texts), " / ".join(oks)

    s = result.get("servers", {})
    short = _get(s, "thox", "prefill_short", "prompt_tokens") or _get(
        s, "llama_server", "prefill_short", "prompt_tokens"
    )
    long = _get(s, "thox", "prefill_long", "prompt_tokens") or _get(s, "llama_server", "prefill_long", "prompt_tokens")
    cfg = result.get("config", {})
    rows: list[tuple[str, str, int]] = [
        (
            f"single-stream decode, tok/s ({cfg.get('decode_tokens', 128)} tokens, median of "
            f"{cfg.get('decode_runs', 5)})",
            "decode",
            1,
        ),
        (f"prefill, tok/s (~{short or 40}-token prompt)", "prefill_short", 0),
        (f"prefill, tok/s (~{long or 500}-token prompt)", "prefill_long", 0),
        (f"time to first token p50, ms (~{short or 40}-token prompt, 1 stream)", "ttft_p50", 1),
        (f"time to first token p95, ms (~{short or 40}-token prompt, 1 stream)", "ttft_p95", 1),
    ]
    for n in cfg.get("streams", [1, 4, 16]):
        rows.append((f"aggregate tok/s, {n} concurrent stream{'s' if n > 1 else ''}", f"agg_{n}", 1))
    for n in cfg.get("streams", [1, 4, 16]):
        rows.append((f"time to first token p95, ms, {n} concurrent stream{'s' if n > 1 else ''}", f"ttft95_{n}", 0))
    rows.append(("peak RSS, MB (server process tree: sum of VmHWM)", "rss", 0))
    rows.append(("RSS at the end of the run, MB", "rss_end", 0))
    lines = [
        "| metric | Thox | llama-server --parallel 16 | llama-cpp-python server | ratio vs target | pass |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for label, key, digits in rows:
        values = [_fmt(metric(result, p, key), digits) for p in PEERS]
        ratio, ok = judged(key)
        lines.append(f"| {label} | {' | '.join(values)} | {ratio} | {ok} |")
    top1 = _get(result, "agreement", "top1_agreement")
    headline = _get(result, "agreement", "headline")
    corr = _get(result, "agreement", headline, "corr_median") if headline else None
    detail = f" ({headline} graph; logit correlation median {corr})" if headline and corr is not None else ""
    ratio, ok = judged("top1")
    tokens = _get(result, "agreement", "tokens") or 256
    lines.append(
        f"| top-1 agreement with llama.cpp, teacher-forced over {tokens} tokens{detail} | {_fmt(top1, 3)} | "
        f"reference | | {ratio} | {ok} |"
    )
    ratio, ok = judged("lag_p99")
    lag = _get(s, "thox", "event_loop")
    lines.append(
        f"| agent event-loop lag p99 / max, ms (16-stream run) | {_fmt(_get(lag, 'lag_p99_ms'), 2)} / "
        f"{_fmt(_get(lag, 'lag_max_ms'), 2)} | | | {ratio} | {ok} |"
    )
    out = ["\n".join(lines)]

    emb = result.get("embeddings") or {}
    if emb.get("thox") or emb.get("sentence_transformers"):
        ours, st = emb.get("thox") or {}, emb.get("sentence_transformers") or {}
        ratio, ok = judged("cosine")
        n = st.get("batch_size") or ours.get("batch_size") or 32
        out.append(
            "\n".join(
                [
                    "| embeddings (all-MiniLM-L6-v2) | Thox | sentence-transformers (torch, same CPU) | ratio | pass |",
                    "| --- | ---: | ---: | --- | --- |",
                    f"| embeddings/s, 1 input | {_fmt(ours.get('emb_s_1'))} | {_fmt(st.get('emb_s_1'))} | "
                    f"{_times(_ratio(ours.get('emb_s_1'), st.get('emb_s_1')))} | |",
                    f"| embeddings/s, batch of {n} | {_fmt(ours.get('emb_s_batch'))} | {_fmt(st.get('emb_s_batch'))} | "
                    f"{_times(_ratio(ours.get('emb_s_batch'), st.get('emb_s_batch')))} | |",
                    f"| cosine to sentence-transformers, min / mean | {_fmt(emb.get('cosine_min'), 5)} / "
                    f"{_fmt(emb.get('cosine_mean'), 5)} | reference | {ratio} | {ok} |",
                ]
            )
        )
    notes = [f"- {n}" for n in result.get("notes", [])]
    machine = result.get("machine", {})
    header = (
        f"Measured {result.get('date', '?')} on {machine.get('cpu', '?')} ({machine.get('cpus', '?')} CPUs), "
        f"{cfg.get('threads', 2)} threads for every server, same GGUF ({cfg.get('gguf', '?')}), "
        f"{'quick run' if cfg.get('quick') else 'full run'}; load average before the run: "
        f"{machine.get('loadavg_before', '?')}."
    )
    quiet = [
        f"{label} {_get(s, p, 'cpu', 'other_processes_percent')}%"
        for p, label in (("thox", "Thox"), ("llama_server", "llama-server"), ("llama_cpp_python", "llama-cpp-python"))
        if _get(s, p, "cpu", "other_processes_percent") is not None
    ]
    if quiet:
        header += " CPU used by other processes while each server was measured: " + ", ".join(quiet) + "."
    return "\n\n".join([header, *out, *(["Notes:\n" + "\n".join(notes)] if notes else [])]) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    """Bars for decode, prefill and aggregate tokens/s at each stream count, one colour per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "thox": "Thox",
        "llama_server": "llama-server --parallel 16",
        "llama_cpp_python": "llama-cpp-python server",
    }
    colours = {"thox": "#d95f02", "llama_server": "#1b9e77", "llama_cpp_python": "#7570b3"}
    streams = result.get("config", {}).get("streams", [1, 4, 16])
    panels = [
        (
            "Single stream, tokens/s",
            [("decode", "decode"), ("prefill ~40", "prefill_short"), ("prefill ~500", "prefill_long")],
        ),
        ("Aggregate decode tokens/s", [(f"{n} stream{'s' if n > 1 else ''}", f"agg_{n}") for n in streams]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(PEERS)
    for ax, (title, groups) in zip(axes, panels, strict=True):
        for i, peer in enumerate(PEERS):
            values = [metric(result, peer, key) or 0 for _, key in groups]
            xs = [g + (i - (len(PEERS) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, values, width, label=labels[peer], color=colours[peer])
            for bar, value in zip(bars, values, strict=True):
                if value:
                    ax.annotate(
                        f"{value:.0f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        ax.set_xticks(range(len(groups)), [g for g, _ in groups])
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    machine = result.get("machine", {})
    fig.suptitle(
        f"SmolLM2-135M Q4_1, {result.get('config', {}).get('threads', 2)} threads, "
        f"{machine.get('cpu', '')} - {result.get('date', '')[:10]}"
        f"{' (quick run)' if result.get('config', {}).get('quick') else ''}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_section(table_md: str) -> str:
    """What goes between the README markers: the table and how to reproduce it."""
    return (
        f"{README_START}\n{table_md.strip()}\n\n![benchmark chart](bench/results/latest.png)\n\n"
        f"Reproduce (the first run builds both peers from source, about 25 minutes on 2 cores; a run takes "
        f"about 7 minutes; the numbers are only meaningful on an otherwise idle machine):\n\n"
        f"```sh\n{REPRODUCE}\nmake bench ARGS=--quick   # a smoke run of a few minutes "
        f"(writes bench/results/quick.*)\n```\n\nRaw numbers, machine and versions: "
        f"`bench/results/latest.json`; how each number is measured: `bench/workload.py`.\n{README_END}"
    )


def update_readme(readme: Path, table_md: str) -> None:
    """Replace the text between the bench markers in README.md (which must already hold them)."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} markers")
    readme.write_text(pattern.sub(lambda _: readme_section(table_md), text, count=1))
