"""Markdown for docs/benchmarks-log.md from benchmarks/serve_load.py's JSON, targets checked.

.venv/bin/python benchmarks/serve_report.py benchmarks/results/serve_load.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

Target = tuple[str, str, bool]  # what, measured, met


def _head(title: str, run: dict) -> list[str]:
    quick = " **QUICK SMOKE RUN: not figures to publish.**" if run["quick"] else ""
    threads = run.get("server_threads", "torch default")
    threads = "" if threads == "torch default" else f" Servers with {threads} torch threads."
    return [
        f"#### {title}",
        "",
        f"Command: `{run['command']}` ({run['date']}, commit {run['commit']}, "
        f"{run['minutes']:.1f} min).{threads}{quick}",
        "",
    ]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float], digits: int = 1) -> str:
    """``median (min–max)``, or the value alone when there is one."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{_median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def servers(r: dict) -> tuple[list[str], list[Target]]:
    phases = r["phases"]
    ks = sorted({p["adapters"] for p in phases})
    clients = sorted({p["clients"] for p in phases})
    rounds = sorted({p.get("round", 0) for p in phases})
    k, most = ks[-1], clients[-1]
    at = {(p.get("round", 0), p["server"], p["adapters"], p["clients"]): p for p in phases}

    def each(server: str, n: int, c: int, key: str) -> list[float]:
        """``key`` of that phase in every round that ran it (NaN where a run lacks it)."""
        return [
            at[rd, server, n, c].get(key, float("nan")) for rd in rounds if (rd, server, n, c) in at
        ]

    def ratios(a: tuple[str, int], b: tuple[str, int], c: int) -> list[float]:
        """Per round, req/s of ``a`` over ``b`` (server, K), at ``c`` clients."""
        pairs = [((rd, a[0], a[1], c), (rd, b[0], b[1], c)) for rd in rounds]
        return [
            at[x]["requests_per_sec"] / at[y]["requests_per_sec"]
            for x, y in pairs
            if x in at and y in at
        ]

    lines = _head(f"HTTP servers, closed-loop clients, K=1 and K={k} adapters", r["run"])
    lines += [
        f"{len(rounds)} round(s); per round each server holds all {k} adapters and runs, at "
        f"every client count, a K=1 phase (all requests name a0) then a K={k} phase "
        "(round-robin). Figures are the median over the rounds (min–max); ratios are taken "
        "within a round, then the median.",
        "",
        "| server | K | clients | req/s | p50 ms | p95 ms | p99 ms | failed | RSS MB "
        "| cores: server / client |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server in ("lorakit", "peft"):
        name = "lorakit serve" if server == "lorakit" else "FastAPI + PEFT"
        for n in ks:
            for c in clients:
                if not each(server, n, c, "requests_per_sec"):
                    continue
                cores = [
                    _median(each(server, n, c, key)) for key in ("server_cores", "client_cores")
                ]
                lines.append(
                    f"| {name} | {n} | {c} | {_spread(each(server, n, c, 'requests_per_sec'))} | "
                    f"{_median(each(server, n, c, 'p50_ms')):.0f} | "
                    f"{_median(each(server, n, c, 'p95_ms')):.0f} | "
                    f"{_median(each(server, n, c, 'p99_ms')):.0f} | "
                    f"{sum(each(server, n, c, 'failed'))} | "
                    f"{_median(each(server, n, c, 'rss_mb')):.0f} | "
                    f"{cores[0]:.2f} / {cores[1]:.2f} |"
                )
    lines += [
        "",
        f"| clients | lorakit K={k} / K=1 req/s | lorakit / PEFT req/s, K=1 | "
        f"lorakit / PEFT req/s, K={k} | p99 ms lorakit vs PEFT, K={k} |",
        "|---|---|---|---|---|",
    ]
    mixed: list[float] = []
    for c in clients:
        mixed.append(_median(ratios(("lorakit", k), ("lorakit", 1), c)))
        lines.append(
            f"| {c} | {_spread(ratios(('lorakit', k), ('lorakit', 1), c), 2)}x | "
            f"{_spread(ratios(('lorakit', 1), ('peft', 1), c), 2)}x | "
            f"{_spread(ratios(('lorakit', k), ('peft', k), c), 2)}x | "
            f"{_median(each('lorakit', k, c, 'p99_ms')):.0f} vs "
            f"{_median(each('peft', k, c, 'p99_ms')):.0f} |"
        )
    lines += [
        "",
        f"Both servers load the same adapter directories: p(positive) of one sentence from "
        f"each of the {k} differs by at most {r['probe_max_abs_diff']:.1e} between them.",
    ]
    worst = min(range(len(clients)), key=lambda i: mixed[i])
    targets = [
        (
            f"lorakit K={k} mixed keeps >= 80% of K=1's req/s (every client count; median "
            "over rounds)",
            f"{mixed[worst]:.2f}x at worst ({clients[worst]} clients)",
            min(mixed) >= 0.8,
        )
    ]
    for n in (1, k):
        ratio = _median(ratios(("lorakit", n), ("peft", n), most))
        p99 = _median(each("lorakit", n, most, "p99_ms")), _median(each("peft", n, most, "p99_ms"))
        targets.append(
            (
                f">= 3x the PEFT server's req/s at {most} clients with lower p99, K={n}",
                f"{ratio:.2f}x; p99 {p99[0]:.0f} vs {p99[1]:.0f} ms",
                ratio >= 3 and p99[0] < p99[1],
            )
        )
    return lines, targets


def inprocess(r: dict) -> tuple[list[str], list[Target]]:
    s = r["seconds"]
    ratio = s["peft"] / s["lorakit"]
    lines = _head("In process: one mixed-adapter forward", r["run"])
    lines += [
        f"{r['rows']} SST-2 validation sentences padded to {r['tokens']} tokens, adapters "
        f"a0..a{r['adapters'] - 1} round-robin; median of {r['repeats']} calls taken in turns.",
        "",
        "| forward | ms per batch | rows/s | vs PEFT |",
        "|---|---|---|---|",
    ]
    for name, label in (
        ("lorakit", "lorakit `AdapterSet.logits(batch, names)`"),
        ("peft", "PEFT `model(**batch, adapter_names=names)`"),
    ):
        lines.append(
            f"| {label} | {1e3 * s[name]:.1f} | {r['rows'] / s[name]:.0f} | "
            f"{s['peft'] / s[name]:.2f}x |"
        )
    lines += ["", f"Largest logit difference between the two: {r['max_abs_logit_diff']:.1e}."]
    targets = [
        ("in-process mixed forward >= 1.2x PEFT's", f"{ratio:.2f}x", ratio >= 1.2),
        (
            "its logits equal PEFT's (max abs diff <= 1e-4)",
            f"{r['max_abs_logit_diff']:.1e}",
            r["max_abs_logit_diff"] <= 1e-4,
        ),
    ]
    return lines, targets


def memory(r: dict) -> tuple[list[str], list[Target]]:
    rows = r["rows"]
    ratio = rows[-1]["rss_mb"] / rows[0]["rss_mb"]
    lines = _head("Memory: lorakit serve with 1 adapter and with 8", r["run"])
    lines += [
        f"RSS of the server process (/proc VmRSS) at start-up and after {r['seconds']:.0f} s "
        f"of {r['clients']} closed-loop clients over its adapters; peak is VmHWM.",
        "",
        "| adapters loaded | RSS idle MB | RSS after load MB | peak RSS MB |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {x['adapters']} | {x['idle_mb']:.0f} | {x['rss_mb']:.0f} | {x['peak_mb']:.0f} |"
        for x in rows
    ]
    what = f"memory for {rows[-1]['adapters']} adapters <= 1.1x that for one"
    return lines, [(what, f"{ratio:.3f}x", ratio <= 1.1)]


def soak(r: dict) -> tuple[list[str], list[Target]]:
    change = r["rss_last_mb"] / r["rss_first_mb"] - 1
    w = r["window"]
    lines = _head(f"Soak: {r['clients']} clients for {r['seconds']:.0f} s", r["run"])
    lines += [
        "lorakit serve with 8 adapters, requests round-robin over them. RSS sampled every "
        f"0.5 s; compared once the first {w:,} requests are answered and at the end.",
        "",
        f"| requests | req/s | failed | p50 ms | p99 ms | RSS after {w:,} MB | "
        "RSS at the end MB | change | max RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['requests']:,} | {r['requests_per_sec']:.1f} | {r['failed']} | "
        f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rss_first_mb']:.0f} | "
        f"{r['rss_last_mb']:.0f} | {100 * change:+.1f}% | {r['rss_max_mb']:.0f} |",
    ]
    if r["errors"]:
        lines += ["", f"Failures: {r['errors']}."]
    targets = [
        (
            f"{r['clients']} clients for {r['seconds']:.0f} s: zero failed",
            str(r["failed"]),
            not r["failed"],
        ),
        (
            f"RSS flat (within 5%) between the first and last {w:,} requests",
            f"{100 * change:+.1f}%",
            abs(change) <= 0.05,
        ),
    ]
    return lines, targets


RENDER = {"servers": servers, "inprocess": inprocess, "memory": memory, "soak": soak}


def render(results: dict) -> str:
    """Every section's tables, then one table of every target and whether it is met."""
    m = results["machine"]
    v = m["versions"]
    lines = [
        f"### Serving under load, {m['date']}",
        "",
        f"Machine: {m['cpu']}; torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}.  ",
        "Setup: the embedded MiniLM; LoRA adapters r=8, alpha 8 on query/key/value/dense "
        "(configs/sst2_minilm.yaml's rank until 2026-11-30) with seeded random weights: "
        "throughput does not depend on their values. SST-2 validation sentences. One server "
        "runs at a time with torch's default threads; the closed-loop clients (one asyncio + "
        "aiohttp process) share the machine. The peer is benchmarks/peft_server.py: FastAPI + "
        "PEFT, `set_adapter` and one forward per request under a lock.",
    ]
    targets: list[Target] = []
    for section, fn in RENDER.items():
        if section in results:
            more, met = fn(results[section])
            lines += ["", *more]
            targets += met
    lines += ["", "#### Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {what} | {got} | {'yes' if ok else '**no**'} |" for what, got, ok in targets]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())), end="")
