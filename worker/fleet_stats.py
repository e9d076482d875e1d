"""The fleet-wide job counters behind /metrics, the dashboard and progress messages.

The scripts keep one hash (`STATS_KEY`) with one counter per kind of status move,
`from>to` (`>queued` for an enqueue), and a few event counts (`deduplicated`,
`swept`, `duplicated`). A move is then one HINCRBY. Keeping live counts and
totals apart cost two per move: running -1 and applied +1, say, which was a
tenth of a change's Redis commands. Totals and live counts are derived here:
a status's live count is its moves in less its moves out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from worker.contract import STATS_KEY

TERMINAL = ("applied", "rejected", "failed", "cancelled")
LIVE = ("queued", "running", "waiting")
# Shown by /metrics and the dashboard: jobs ever enqueued, and ever ending each way.
TOTALS = ("enqueued", *TERMINAL)

__all__ = ["LIVE", "STATS_KEY", "TERMINAL", "TOTALS", "FleetCounts"]


@dataclass
class FleetCounts:
    totals: dict[str, int] = field(default_factory=dict)  # enqueued, outcomes, events
    live: dict[str, int] = field(default_factory=dict)  # jobs now in each live status

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes] | Mapping[str, str]) -> FleetCounts:
        counts = cls(totals=dict.fromkeys(TOTALS, 0), live=dict.fromkeys(LIVE, 0))
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            count = int(value)
            source, arrow, target = name.partition(">")
            if not arrow:  # an event: deduplicated, swept, duplicated, ...
                counts.totals[name] = counts.totals.get(name, 0) + count
                continue
            if source:
                counts.live[source] = counts.live.get(source, 0) - count
            else:
                counts.totals["enqueued"] += count
            if target in TERMINAL:
                counts.totals[target] += count
            else:
                counts.live[target] = counts.live.get(target, 0) + count
            if (source, target) == ("running", "waiting"):
                counts.totals["retried"] = counts.totals.get("retried", 0) + count
        return counts

    @property
    def finished(self) -> int:
        return sum(self.totals[name] for name in TERMINAL)
