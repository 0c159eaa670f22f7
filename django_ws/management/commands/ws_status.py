"""``manage.py ws_status``: the websocket instances, as the registry in Redis shows them."""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from uwsgi_ws.ops import Registry, merge_snapshots


class Command(BaseCommand):
    help = (
        "Show the live websocket instances (address, readiness, workers, connections, channels), "
        "the busiest channels and the Redis round trip, from the instance registry in Redis."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
        parser.add_argument("--top", type=int, default=10, help="busiest channels to show (default 10)")

    def handle(self, *args: Any, **options: Any) -> None:
        from redis.exceptions import RedisError

        from django_ws.conf import get_settings
        from django_ws.publishing import get_redis

        conf = get_settings()
        client = get_redis()
        try:
            rtts = []
            for _ in range(3):
                started = time.perf_counter()
                client.ping()
                rtts.append((time.perf_counter() - started) * 1000)
            workers = Registry(client, conf.prefix).workers()
        except RedisError as exc:
            raise CommandError(f"cannot reach Redis at {conf.redis_url}: {type(exc).__name__}") from None
        report = status_report(workers, top=options["top"], redis_ms=sorted(rtts)[1])
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, sort_keys=True))
            return
        self.stdout.write(render(report))


def status_report(workers: list[dict[str, Any]], *, top: int, redis_ms: float) -> dict[str, Any]:
    """Everything ws_status shows, from the registry's worker snapshots."""
    from uwsgi_ws.ops import group_instances

    instances = [i.as_dict() for i in group_instances(workers)]
    total = merge_snapshots(workers)
    busiest = sorted(total["top"].items(), key=lambda item: (-item[1], item[0]))[:top]
    return {
        "redis_round_trip_ms": round(redis_ms, 3),
        "instances": instances,
        "connections": sum(i["connections"] for i in instances),
        "busiest_channels": [{"channel": name, "subscribers": n} for name, n in busiest],
        "messages_delivered": total["stats"]["delivered"],
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    now = time.time()
    rows = [
        [
            i["address"],
            "draining" if i["draining"] else ("ready" if i["ready"] else "not ready"),
            str(i["workers"]),
            str(i["connections"]),
            str(i["channels"]),
            str(i["subscriptions"]),
            f"{max(0.0, now - i['started']):.0f}s",
            f"{i['heartbeat_age']:.1f}s",
        ]
        for i in report["instances"]
    ]
    parts = [
        f"Redis round trip: {report['redis_round_trip_ms']:.2f} ms",
        f"{len(report['instances'])} live instance(s), {report['connections']} connection(s)",
        "",
        _table(["instance", "state", "workers", "connections", "channels", "subscriptions", "up", "heartbeat"], rows),
        "",
        "busiest channels (subscribers on all instances):",
        _table(
            ["channel", "subscribers"],
            [[c["channel"], str(c["subscribers"])] for c in report["busiest_channels"]],
        ),
    ]
    return "\n".join(parts) + "\n"
