"""Regenerate BENCHMARKS.md and the plots from a results file of bench/run.py.

    .venv/bin/python bench/report.py [bench/results/<timestamp>.json]

Without an argument, the newest full run in bench/results/ (else the newest run).
The hand-written analysis in bench/NOTES.md, if present, is included as is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PLOTS = BENCH / "plots"
OUT = ROOT / "BENCHMARKS.md"
COLORS = {"ours": "#1f77b4", "channels": "#d62728"}
SHORT = {"ours": "ours", "channels": "Channels"}

# The targets our stack is held to (see the brief in BENCHMARKS.md).
TARGET_N = 10_000
TARGET_P99_MS = 250.0
TARGET_KB_PER_CONN = 40.0
TARGET_RATE_FACTOR = 3.0
TARGET_P99_FACTOR = 1 / 3


def pick(argv: list[str]) -> Path:
    if len(argv) > 1:
        return Path(argv[1])
    files = sorted((BENCH / "results").glob("*.json"))
    if not files:
        raise SystemExit("no results in bench/results/: run `make bench` first")
    full = [f for f in files if json.loads(f.read_text()).get("mode") == "full"]
    return (full or files)[-1]


def fmt(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        text = f"{value:,.{digits}f}"
    else:
        text = f"{value:,}"
    return text + unit


def get(run: dict, *path: str) -> Any:
    node: Any = run
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def lost(run: dict) -> int | None:
    parts = [get(run, "broadcast", "lost"), get(run, "targeted", "lost")]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None


def main_table(runs: list[dict]) -> list[str]:
    lines = [
        "| system | N | established | connect s (rate/s) | handshake p50 / p99 ms | broadcast p50 / p99 / max ms "
        "| deliveries/s | lost | RSS KiB/conn all (ws inst.) | CPU s / 100k deliveries (Redis) | Redis conns |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if "error" in r and "connect" not in r:
            lines.append(f"| {SHORT[r['system']]} | {r['n']:,} | failed: {r['error'][:80]} |||||||||")
            continue
        c = r.get("connect", {})
        lat = get(r, "broadcast", "latency_ms") or {}
        per = r.get("per_connection", {})
        ws = get(per, "websocket_instance", "rss_kb")
        rss = fmt(get(per, "all", "rss_kb"), 1) + (f" ({fmt(ws, 1)})" if ws is not None else "")
        cpu = fmt(get(r, "broadcast", "cpu_s_per_100k"), 2)
        rcpu = get(r, "broadcast", "redis_cpu_s_per_100k")
        if rcpu is not None:
            cpu += f" ({fmt(rcpu, 2)})"
        lines.append(
            f"| {SHORT[r['system']]} | {r['n']:,} | {fmt(c.get('established'))} "
            f"| {fmt(c.get('seconds'), 1)} ({fmt(c.get('rate_per_s'))}) "
            f"| {fmt(get(c, 'handshake_ms', 'p50'), 1)} / {fmt(get(c, 'handshake_ms', 'p99'), 1)} "
            f"| {fmt(lat.get('p50'), 1)} / {fmt(lat.get('p99'), 1)} / {fmt(lat.get('max'), 1)} "
            f"| {fmt(get(r, 'broadcast', 'deliveries_per_s'))} | {fmt(lost(r))} | {rss} | {cpu} "
            f"| {fmt(get(r, 'redis_clients', 'total'))} |"
        )
    return lines


def targeted_table(runs: list[dict]) -> list[str]:
    lines = [
        "| system | N | sent (rate/s) | delivered | lost | misdelivered | p50 / p99 / max ms "
        "| publish call p50 / p99 ms | CPU s / 100k deliveries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        t = r.get("targeted")
        if not t:
            continue
        lat = t["latency_ms"]
        lines.append(
            f"| {SHORT[r['system']]} | {r['n']:,} | {fmt(t['sent'])} ({fmt(t['publish_rate'])}) "
            f"| {fmt(t['delivered'])} | {fmt(t['lost'])} | {fmt(t['misdelivered'])} "
            f"| {fmt(lat['p50'], 2)} / {fmt(lat['p99'], 2)} / {fmt(lat['max'], 1)} "
            f"| {fmt(t['publish_call_ms_p50'], 2)} / {fmt(t['publish_call_ms_p99'], 2)} "
            f"| {fmt(t['cpu_s_per_100k'], 2)} |"
        )
    return lines


def detail_table(runs: list[dict]) -> list[str]:
    lines = [
        "| system | N | server RSS idle MiB (base) | server PSS KiB/conn | CPU s in broadcasts: "
        "server (by part) / Redis / load generator | targeted mix CPU s: server (by part) | dropped by server "
        "| close codes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if "idle" not in r:
            continue
        b = r.get("broadcast", {})
        parts = ", ".join(f"{k} {v:.2f}" for k, v in (b.get("cpu_s_by_group") or {}).items() if k != "all")
        t = r.get("targeted") or {}
        tparts = ", ".join(f"{k} {v:.2f}" for k, v in (t.get("cpu_s_by_group") or {}).items() if k != "all")
        lines.append(
            f"| {SHORT[r['system']]} | {r['n']:,} | {r['idle']['all']['rss_kb'] / 1024:,.1f} "
            f"({r['base']['all']['rss_kb'] / 1024:,.1f}) | {fmt(get(r, 'per_connection', 'all', 'pss_kb'), 1)} "
            f"| {fmt(b.get('server_cpu_s'), 2)}{f' ({parts})' if parts else ''} / {fmt(b.get('redis_cpu_s'), 2)} "
            f"/ {fmt(b.get('client_cpu_s'), 2)} | {fmt(t.get('server_cpu_s'), 2)}{f' ({tparts})' if tparts else ''} "
            f"| {fmt(r.get('dropped_by_server'))} | {r.get('close_codes') or '–'} |"
        )
    return lines


def targets(runs: list[dict], workers: int) -> list[str]:
    ours = {r["n"]: r for r in runs if r["system"] == "ours"}
    peer = {r["n"]: r for r in runs if r["system"] == "channels"}
    lines = ["| target | measured | met? |", "|---|---|---|"]
    big = ours.get(TARGET_N)
    if big is None:
        return [f"No run of our stack at N = {TARGET_N:,}: targets not evaluated (quick mode?)."]

    def row(target: str, measured: str, ok: bool | None) -> None:
        lines.append(f"| {target} | {measured} | {'yes' if ok else ('–' if ok is None else '**no**')} |")

    est = get(big, "connect", "established") or 0
    row(
        f"{TARGET_N:,} websockets on one websocket worker",
        f"{est:,} established, {workers} worker(s), {fmt(big.get('dropped_by_server'))} dropped",
        est >= TARGET_N and workers == 1 and not big.get("dropped_by_server"),
    )
    p99 = get(big, "broadcast", "latency_ms", "p99")
    rounds = sorted(
        r["latency_ms"]["p99"] for r in get(big, "broadcast", "rounds") or [] if get(r, "latency_ms", "p99") is not None
    )
    spread = (
        f"; per round: min {fmt(rounds[0], 1)}, median {fmt(rounds[len(rounds) // 2], 1)}, max {fmt(rounds[-1], 1)} ms"
        if rounds
        else ""
    )
    row(
        f"broadcast to {TARGET_N:,}: p99 < {TARGET_P99_MS:.0f} ms",
        f"p99 {fmt(p99, 1)} ms over all rounds' deliveries"
        + (f" ({p99 / TARGET_P99_MS:.2f}x the target)" if p99 else "")
        + spread,
        p99 is not None and p99 < TARGET_P99_MS,
    )
    total_lost = sum(lost(r) or 0 for r in ours.values())
    row("zero loss (every N, broadcast and targeted)", f"{total_lost:,} lost", total_lost == 0)
    kb = get(big, "per_connection", "websocket_instance", "rss_kb")
    row(
        f"< {TARGET_KB_PER_CONN:.0f} KiB RSS per idle connection, all websocket-instance processes",
        f"{fmt(kb, 1)} KiB at N = {TARGET_N:,}"
        + "".join(
            f"; {fmt(get(r, 'per_connection', 'websocket_instance', 'rss_kb'), 1)} at {n:,}"
            for n, r in sorted(ours.items())
            if n != TARGET_N
        ),
        kb is not None and kb < TARGET_KB_PER_CONN,
    )
    for n in sorted(ours):
        mine, theirs = ours[n], peer.get(n)
        if theirs is None or "broadcast" not in theirs:
            why = "peer not run" if theirs is None else f"peer failed: {theirs.get('error', 'no broadcast figures')}"
            row(f"N = {n:,}: >= {TARGET_RATE_FACTOR:.0f}x the peer's deliveries/s and <= 1/3 of its p99", why, None)
            continue
        a, b = get(mine, "broadcast", "deliveries_per_s"), get(theirs, "broadcast", "deliveries_per_s")
        pa, pb = get(mine, "broadcast", "latency_ms", "p99"), get(theirs, "broadcast", "latency_ms", "p99")
        if a and b:
            row(
                f"N = {n:,}: deliveries/s >= {TARGET_RATE_FACTOR:.0f}x the peer's",
                f"{a:,.0f} vs {b:,.0f}/s: {a / b:.2f}x",
                a / b >= TARGET_RATE_FACTOR,
            )
        if pa and pb:
            row(
                f"N = {n:,}: broadcast p99 <= 1/3 of the peer's",
                f"{pa:,.1f} vs {pb:,.1f} ms: {pa / pb:.2f}x",
                pa / pb <= TARGET_P99_FACTOR,
            )
    return lines


def plots(doc: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    runs = [r for r in doc["runs"] if "broadcast" in r]
    systems = [s for s in ("ours", "channels") if any(r["system"] == s for r in runs)]
    made = []

    def series(system: str, *path: str) -> tuple[list[int], list[float]]:
        pts = [(r["n"], get(r, *path)) for r in runs if r["system"] == system and get(r, *path) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    for s in systems:
        for q, style in (("p50", "--"), ("p99", "-")):
            x, y = series(s, "broadcast", "latency_ms", q)
            ax.plot(x, y, style, marker="o", color=COLORS[s], label=f"{doc['systems'][s]['label']} {q}")
    ax.axhline(TARGET_P99_MS, color="grey", lw=0.8, ls=":", label=f"target p99 {TARGET_P99_MS:.0f} ms")
    ax.set(xscale="log", yscale="log", xlabel="connections", ylabel="ms", title="Broadcast delivery latency")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for s in systems:
        x, y = series(s, "broadcast", "deliveries_per_s")
        ax.plot(x, y, marker="o", color=COLORS[s], label=doc["systems"][s]["label"])
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="connections",
        ylabel="deliveries / s",
        title="Broadcast fan-out rate (N / time to last delivery)",
    )
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for s in systems:
        x, y = series(s, "per_connection", "all", "rss_kb")
        ax.plot(x, y, marker="o", color=COLORS[s], label=f"{SHORT[s]}: all server processes")
        x, y = series(s, "per_connection", "websocket_instance", "rss_kb")
        if y:
            ax.plot(x, y, "--", marker="s", color=COLORS[s], label=f"{SHORT[s]}: websocket instance")
    ax.axhline(TARGET_KB_PER_CONN, color="grey", lw=0.8, ls=":", label=f"target {TARGET_KB_PER_CONN:.0f} KiB")
    ax.set(xscale="log", xlabel="connections", ylabel="KiB", title="Server RSS per idle connection")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for s in systems:
        x, y = series(s, "broadcast", "cpu_s_per_100k")
        ax.plot(x, y, marker="o", color=COLORS[s], label=f"{SHORT[s]}: broadcast")
        x, y = series(s, "targeted", "cpu_s_per_100k")
        ax.plot(x, y, "--", marker="s", color=COLORS[s], label=f"{SHORT[s]}: targeted mix")
    ax.set(xscale="log", yscale="log", xlabel="connections", ylabel="CPU s", title="Server CPU per 100,000 deliveries")
    ax.legend(fontsize=7)
    fig.suptitle(f"django-uwsgi-ws vs Django Channels: run {doc['timestamp']} ({doc['machine']['cpus']} cores)")
    fig.tight_layout()
    path = PLOTS / "summary.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    made.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        values = sorted(get(r, "broadcast", "latency_quantiles_ms") or [])
        if not values:
            continue
        ys = [i / len(values) for i in range(1, len(values) + 1)]
        ls = {1000: ":", 5000: "--"}.get(r["n"], "-")
        ax.plot(values, ys, ls, color=COLORS[r["system"]], label=f"{SHORT[r['system']]} N={r['n']:,}")
    ax.axvline(TARGET_P99_MS, color="grey", lw=0.8, ls=":")
    ax.set(
        xscale="log",
        xlabel="delivery latency, ms (publish call to client receipt)",
        ylabel="share of deliveries",
        title="Broadcast latency distribution (all rounds)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = PLOTS / "latency_cdf.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    made.append(path)
    return [str(p.relative_to(ROOT)) for p in made]


def profile_section(runs: list[dict]) -> list[str]:
    lines = []
    for r in runs:
        prof = r.get("profile")
        if not prof or not prof.get("samples"):
            continue
        lines += [
            f"### py-spy: {SHORT[r['system']]}, N = {r['n']:,}, "
            f"{'websocket worker' if r['system'] == 'ours' else 'Daphne process'} {prof['pids']}",
            "",
            f"{prof['samples']:,} samples at 250 Hz while {prof['rounds']} broadcasts went out back to back "
            f"(raw stacks: {', '.join(prof['files'])}).",
            "",
            "| self time: frame | % of samples |",
            "|---|---:|",
        ]
        lines += [f"| `{name}` | {share} |" for name, share in prof["self_top"][:15]]
        lines += ["", "| inclusive time: frame | % of samples |", "|---|---:|"]
        lines += [f"| `{name}` | {share} |" for name, share in prof["inclusive_top"][:15]]
        lines.append("")
    return lines


def reproduce(cfg: dict) -> str:
    """The command line that repeats a run (only the options that differ from the defaults)."""
    words = ["make bench-quick" if cfg.get("quick") else "make bench"]
    extra = []
    if cfg.get("only") not in (None, "both"):
        extra.append(f"--only {cfg['only']}")
    if cfg.get("profile"):
        extra.append("--profile " + " ".join(cfg["profile"]))
    for key, default in (("workers", 1), ("offload_threads", 0), ("parallel", 100), ("offload_to", "unix")):
        if cfg.get(key, default) != default:
            extra.append(f"--{key.replace('_', '-')} {cfg[key]}")
    if extra:
        words.append(f'BENCH_ARGS="{" ".join(extra)}"')
    return " ".join(words)


def render(doc: dict, source: Path, images: list[str]) -> str:
    m = doc["machine"]
    cfg = doc["config"]
    runs = doc["runs"]
    versions = "\n".join(
        f"- {info['label']}: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        for info in doc["systems"].values()
    )
    notes = (BENCH / "NOTES.md").read_text() if (BENCH / "NOTES.md").exists() else ""
    out = [
        "# Benchmarks: django-uwsgi-ws vs Django Channels",
        "",
        "<!-- Generated by bench/report.py from "
        f"{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}; "
        "edit bench/NOTES.md or bench/report.py, not this file. -->",
        "",
        f"Run `{doc['timestamp']}` ({doc['mode']} mode), results in "
        f"`{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}`.",
        "",
        "## Machine",
        "",
        f"- {m['cpus']} cores ({m['cpu_model']}), {m['memory_mb'] / 1024:.0f} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, open files limit {m['nofile']:,}",
        f"- Redis {doc['redis_version']}, one private `redis-server` on 127.0.0.1, shared by both systems "
        "(flushed between runs)",
        versions,
        "- Everything (servers, Redis, publisher, load generator) on the same 2 cores, over loopback.",
        "",
        "## How to reproduce",
        "",
        "```sh",
        "scripts/bootstrap.sh        # .venv with uWSGI (SSL + PCRE), the project and its test extras",
        "make bench                  # full: N = 1,000 / 5,000 / 10,000, both systems (about 6 minutes;"
        " 2 more the first time, for the peer's virtualenv)",
        "make bench-quick            # N = 200, one round, both systems (under 2 minutes)",
        ".venv/bin/python bench/run.py --help     # --only ours|channels, --n, --rounds, --workers, --profile ours",
        "```",
        "",
        f"This run: `{reproduce(cfg)}`.",
        "",
        "The bench script installs what is missing: `picows` (load generator) and `matplotlib` (plots) into "
        "`.venv`, and the peer's own virtualenv `bench/.venv-channels` (`python3 -m venv`, then pip: "
        "channels>=4, channels-redis, daphne, django 5.2, redis-py < 8). Each run writes "
        "`bench/results/<timestamp>.json` and regenerates this file and `bench/plots/*.png` "
        "(`bench/report.py` alone redraws them).",
        "",
        "## Method",
        "",
        "For each system and each N, one after the other, with the server started fresh:",
        "",
        f"1. **Connect**: one asyncio process per {cfg['per_client']:,} connections (picows) opens N websockets, "
        f"at most {cfg['parallel']} handshakes in flight in total. A connection counts as established when "
        "the server says it is subscribed: our `ready` frame; the peer's consumer sends the same frame after "
        "its `group_add` calls. *Handshake* time is from `connect()` to that frame.",
        "2. **Idle**: after "
        f"{cfg['settle']} s, the RSS (and PSS) of all server processes from /proc, minus the same before any "
        "connection, divided by N; Redis connections from `CLIENT LIST`.",
        f"3. **Broadcast**: {cfg['rounds']} rounds, {cfg['pause']} s apart; a separate publisher process stamps "
        "`time.time()` into the payload just before the publish call (`django_ws.publish(..., broadcast=True)`; "
        '`channel_layer.group_send("bench", ...)`); each client stamps each frame on receipt; latency is the '
        "difference (same clock). *deliveries/s* is all deliveries over the summed time from publish to the "
        "round's last delivery. *lost*: connections that did not get a round's message (and targeted "
        "messages that never arrived). *CPU*: utime+stime of all server processes (/proc/<pid>/stat) over the "
        "broadcast phase, per 100,000 deliveries; Redis in parentheses.",
        f"4. **Targeted mix**: {cfg['targeted_rate']:.0f} messages/s for {cfg['targeted_seconds']:.0f} s, message "
        "i to connection i mod N only (ours: its session channel, `?subscribe-session` with its own session "
        "cookie; peer: the group `u<i>` it joined), paced by the publisher.",
        "",
        "Every connection subscribes to both the broadcast channel and its own channel (so the memory figures "
        "include two subscriptions). The payload is a small JSON object (about 200 bytes per frame), framed once "
        "per message and sent as the same text to every receiver by both systems.",
        "",
        "Configurations: *ours*: `uwsgi --ini uwsgi.ini.example` (front: "
        f"{cfg['front_processes']} processes x {cfg['front_threads']} threads, "
        f"{cfg.get('offload_threads') or 8} offload threads each; websocket "
        f"instance: {cfg['workers']} worker(s), gevent {cfg['async_cores']:,}, reached by the front over "
        f"{'loopback TCP' if cfg.get('offload_to') == 'tcp' else 'a unix socket'} (`DJANGO_WS_OFFLOAD_TO`); "
        f"listen backlog {cfg['listen']:,}), "
        "the example project's middleware (Origin and session checks, signed ticket) on every handshake. "
        "*Channels*: one Daphne process (`daphne -e tcp:...:backlog=...`), `RedisChannelLayer` (the documented "
        "production layer) with its default capacity and expiry, on redis-py 7 (redis-py 8 breaks channels_redis "
        "4.3: its 5 s default socket timeout kills consumers blocked in BZPOPMIN, django/channels_redis#422); "
        "the consumer checks nothing (no auth middleware), so it does less per handshake than ours.",
        "",
        "## Results",
        "",
        "Broadcast (all rounds) and idle figures; *lost* adds the targeted mix:",
        "",
        *main_table(runs),
        "",
        "Targeted mix:",
        "",
        *targeted_table(runs),
        "",
        "Details:",
        "",
        *detail_table(runs),
        "",
        "## Targets (our stack)",
        "",
        *targets(runs, int(cfg["workers"])),
        "",
        "## Plots",
        "",
        *[f"![{Path(p).stem}]({p})" for p in images],
        "",
    ]
    prof = profile_section(runs)
    if prof:
        out += ["## Profile", "", *prof]
    if notes:
        out += [notes.rstrip(), ""]
    return "\n".join(out)


def main(argv: list[str]) -> None:
    source = pick(argv).resolve()
    doc = json.loads(source.read_text())
    images = plots(doc)
    OUT.write_text(render(doc, source, images))
    print(f"wrote {OUT.relative_to(ROOT)} and {', '.join(images)}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
