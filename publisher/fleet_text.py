"""The human tables of ``avika-publish fleet`` and ``fleet AGENT_ID`` (DESIGN section 6).

What the rows mean is ``publisher/fleet.py``; here is how a person reads them: relative times
(``12m ago``), silent agents marked, and on a terminal each state in its tone's colour
(``fleet.STATE_TONES`` / ``fleet.ANSI``, the web console's colours too).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from publisher.fleet import (
    DEFAULT_STALE_AFTER,
    STALE_TONE,
    STATE_TONES,
    coloured_table,
    counts_text,
    epoch_seconds,
    shorten,
)


def ago(stamp: str | None, now: datetime | float) -> str | None:
    """``45s``, ``12m``, ``3h05m``, ``2d04h`` since an RFC 3339 time; None when unknown."""
    if not stamp:
        return None
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return stamp
    seconds = max(0, int(epoch_seconds(now) - then))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    parts = [(seconds // 86400, "d"), (seconds % 86400 // 3600, "h"), (seconds % 3600 // 60, "m")]
    text = "".join(f"{n}{unit}" for n, unit in parts if n) + (f"{seconds % 60}s" if seconds % 60 else "")
    return text or "0s"


def state_tone(state: str | None) -> str | None:
    return STATE_TONES.get(state or "")


def format_fleet(
    view: dict[str, Any],
    *,
    now: datetime | float,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    colour: bool = False,
) -> str:
    agents = view["agents"]
    if not agents:
        return "no agents match\n" if view.get("filtered") else "no agents have reported yet\n"
    headers = ("AGENT", "MODE", "PLATFORM", "VERSION", "STATE", "TARGET", "LAST SEEN", "CHANGED", "UPDATE")
    rows = []
    for a in agents:
        seen = ago(a["last_seen"], now)
        rows.append(
            [
                (a["agent_id"], None),
                (a["mode"], None),
                (a["platform"] or None, None),
                (a["version"], None),
                (a["state"], state_tone(a["state"])),
                (a["target_version"], None),
                (f"{seen} ago, SILENT" if a["stale"] else f"{seen} ago", STALE_TONE if a["stale"] else None),
                (f"{ago(a['last_change'], now)} ago" if a["last_change"] else None, None),
                ("available" if a["update_available"] else None, "warn" if a["update_available"] else None),
                *([(shorten(a["last_error"]), "bad")] if a["last_error"] else [(a["last_result"], None)]),
            ]
        )
    lines = coloured_table((*headers, "LAST ERROR / RESULT"), rows, colour=colour)
    states = Counter(a["state"] for a in agents)
    available = [a for a in agents if a["update_available"]]
    silent = sum(1 for a in agents if a["stale"])
    lines += [
        "",
        f"versions: {counts_text(view['versions'])}",
        f"states:   {counts_text(dict(sorted(states.items(), key=lambda kv: str(kv[0]))))}",
    ]
    images = [a for a in available if a["mode"] == "container" and a["image"]]
    if images:
        lines.append("containers to roll: " + ", ".join(f"{a['agent_id']} -> {a['image']}" for a in images))
    lines.append(
        f"{len(agents)} agent(s), {len(available)} with an update available, "
        f"{silent} silent for over {format_duration(stale_after)}"
    )
    return "\n".join(lines) + "\n"


def format_agent(history: dict[str, Any], *, now: datetime | float, colour: bool = False) -> str:
    a = history["agent"]
    seen = ago(a["last_seen"], now)
    lines = [
        f"agent        {a['agent_id']}",
        f"mode         {a['mode']} ({a['platform'] or '-'})",
        f"version      {a['version']}" + (f" (target {a['target_version']})" if a["target_version"] else ""),
        f"state        {a['state']}" + (f" ({ago(a['last_change'], now)} ago)" if a["last_change"] else ""),
        f"last seen    {a['last_seen']} ({seen} ago)" + (", SILENT" if a["stale"] else ""),
        f"last result  {a['last_result'] or '-'}",
    ]
    if a["update_available"]:
        lines.append(
            f"update       available: {a['target_version']}" + (f" ({a['image']})" if a["image"] else "")
        )
    if a["last_error"]:
        lines.append(f"last error   {a['last_error']}")
    events = history["events"]
    lines += ["", f"history ({len(events)} event(s), oldest first; heartbeats are not history):"]
    if events:
        lines += coloured_table(
            ("RECEIVED", "STATE", "VERSION", "TARGET", "ERROR"),
            (
                [
                    (e["received"], None),
                    (e["state"], state_tone(e["state"])),
                    (e["version"], None),
                    (e["target_version"], None),
                    (
                        shorten(": ".join(p for p in (e["failed_state"], e["error"]) if p) or None),
                        "bad" if e["error"] else None,
                    ),
                ]
                for e in events
            ),
            colour=colour,
        )
    return "\n".join(lines) + "\n"
