"""Print the README's "Figures" tables (Markdown) from bench/results/*.json.

.venv/bin/python bench/summary.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:g}"
    return str(value)


def section(result: dict[str, Any], title: str, body: str) -> str:
    goals = "\n".join(
        f"- {'PASS' if g['passed'] else 'FAIL'}: {g['goal']} ({g['measured']})"
        for g in result["goals"]
    )
    return (
        f"### {title}\n\n`{result['command']}` on {result['date'][:10]}, "
        f"{result['machine']}.\n\n{body}\n\n{goals}\n"
    )


def main() -> None:
    parts: list[str] = []
    if b1 := load("b1_caller_latency"):
        cols = ["mode", "clients", "calls", "calls_per_s", "p50_ms", "p99_ms"]
        body = markdown(b1["rows"], cols) + "\n\n" + markdown(b1["saturated"], cols)
        body += "\n\n" + markdown(b1.get("pinned", []), cols)
        body += "\n\n" + markdown(b1["scale_out"], cols)
        parts.append(section(b1, "B1 caller latency", body))
    if b2 := load("b2_throughput"):
        cols = [
            "backend",
            "mode",
            "applied_per_s",
            "x_direct_ceiling",
            "bracket_per_s",
            "x_bracket",
            "prefect_p50_ms",
            "prefect_p99_ms",
            "retried",
            "cpu_ms_queue",
            "cpu_ms_prefect",
        ]
        parts.append(section(b2, "B2 applied throughput", markdown(b2["rows"], cols)))
    if b3 := load("b3_batch_enqueue"):
        cols = ["path", "batch", "clients", "changes", "changes/s", "p50 ms", "p99 ms"]
        parts.append(section(b3, "B3 batch enqueue", markdown(b3["rows"], cols)))
    if b4 := load("b4_redis_cost"):
        rows = [{"phase": k.strip(), **v} for k, v in b4["cost_per_job"].items()]
        body = markdown(rows, ["phase", "commands", "bytes in", "bytes out"])
        body += f"\n\nMemory per pending job: {b4['memory']['bytes_per_pending_job']:,.0f} B."
        parts.append(section(b4, "B4 Redis cost per job", body))
    if b6 := load("b6_queue_ceiling"):
        cols = [
            "workers",
            "applied_per_s",
            "cpu_ms_worker",
            "cpu_ms_redis",
            "cpu_ms_queue",
            "redis_commands_per_change",
            "redis_commands_per_s",
            "redis_core_share",
            "redis_ceiling_per_s",
        ]
        parts.append(section(b6, "B6 the queue's own ceiling", markdown(b6["rows"], cols)))
    if paced := load("b6_queue_paced"):
        cols = ["workers", "applied_per_s", "cpu_ms_worker", "cpu_ms_redis", "cpu_ms_queue"]
        body = markdown(paced["bare_client"], ["mode", "calls_per_s", "cpu_ms_client"])
        body += "\n\n" + markdown(paced["rows"], cols)
        parts.append(section(paced, "B6 paced: the queue's CPU at Prefect's pace", body))
    if limited := load("b6_queue_rate_limited"):
        cols = ["workers", "applied_per_s", "cpu_ms_worker", "cpu_ms_redis"]
        cols += ["redis_commands_per_change"]
        title = "B6 rate-limited: waiting for the shared Prefect budget"
        parts.append(section(limited, title, markdown(limited["rows"], cols)))
    if b5 := load("b5_tasks"):
        body = markdown(b5["answer"], ["call", "p50_ms", "p99_ms"]) + "\n\n"
        cols = ["follow with", "changes", "requests_per_change", "lag_p50_ms", "lag_p95_ms"]
        cols += ["lag_p99_ms", "p50_vs_long_poll"]
        body += markdown(b5["follow"], cols)
        parts.append(section(b5, "B5 MCP tasks", body))
    if not parts:
        sys.exit("no results yet: run `make bench`")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
