"""The whole-fleet summary of ``/v1/fleet`` (DESIGN section 9), over the rules of ``publisher/fleet.py``.

Whole-fleet counts (``total``, ``by_version``, ``by_state``, ``by_mode``, ``stale``,
``update_available``, ``failures``, ``containers_to_roll``), the rollout's progress per mode
(``fleet.progress_position``) and short lists that need a person: silent agents (oldest first),
failures (newest first), containers with an update available (by agent id), ``ATTENTION_ROWS``
each.

Two ways to the same numbers (``tests/test_fleet_summary.py`` holds them equal):
- any store: one streaming pass over ``scan_all()`` (DynamoDB reads its 16 shards in parallel);
- SQLite (``store.aggregates``): the counts grouped in SQL, the wave buckets of the agents not on
  the live version, and three short ordered queries for the lists; so a 5 s poll of 100,000 agents
  costs a fraction of a second, not a Python loop over every row.
Either gives a :class:`FleetPass`: agents counted by (mode, version, state, target_version, stale)
and, off the live version, by (mode, version, wave bucket). ``summarize`` renders it for the live
release as it is now, so a new rollout percent (a halt) shows without reading the fleet again.
:class:`SummaryCache` keeps a pass for the store's ``summary_ttl`` (DynamoDB: 60 s).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agent.manifest import Manifest
from infra.reports.store import ReportStore, Where, rfc3339_ms
from infra.reports.validation import MODES, STATES
from publisher.fleet import (
    DEFAULT_STALE_AFTER,
    FAILURES,
    NOT_PENDING,
    PROGRESS,
    epoch_seconds,
    fleet_row,
    progress_position,
    read_or_fail,
    same_version,
    stale_cutoff,
    update_available,
    version_key,
    wave_bucket,
)

ATTENTION_ROWS = 25  # per list


class _Desc:
    """Reverses the order of a key (newest first out of ``heapq``'s min-heap)."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __lt__(self, other: _Desc) -> bool:
        return self.key > other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key


class _Lowest:
    """The ``n`` rows with the lowest keys, kept while streaming (a bounded max-heap)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._heap: list[tuple[_Desc, dict[str, Any]]] = []

    def offer(self, key: Any, row: dict[str, Any]) -> None:
        item = (_Desc(key), row)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, item)
        elif key < self._heap[0][0].key:
            heapq.heapreplace(self._heap, item)

    def rows(self) -> list[dict[str, Any]]:
        return [row for _, row in sorted(self._heap, key=lambda item: item[0].key)]


@dataclass
class FleetPass:
    """What one look at the whole fleet found; ``summarize`` turns it into the summary."""

    computed_at: str
    stale_after: timedelta
    groups: Counter[tuple[Any, ...]]  # (mode, version, state, target_version, stale) -> agents
    buckets: Counter[tuple[Any, ...]]  # (mode, version, wave bucket) -> agents off the live version
    attention: dict[str, list[dict[str, Any]]]


def _stale_key(view: dict[str, Any]) -> tuple[str, str]:
    return (view["last_seen"] or "", view["agent_id"])


def _failure_key(view: dict[str, Any]) -> tuple[_Desc, str]:
    return (_Desc(view["last_change"] or ""), view["agent_id"])


def pass_over_rows(
    rows: Iterable[dict[str, Any]],
    *,
    now: datetime | float,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    live: Manifest | None = None,
) -> FleetPass:
    """The pass any store can give: one stream of rows (memory bounded by the groups)."""
    cutoff = stale_cutoff(now, stale_after)
    groups: Counter[tuple[Any, ...]] = Counter()
    buckets: Counter[tuple[Any, ...]] = Counter()
    silent, failing, containers = _Lowest(ATTENTION_ROWS), _Lowest(ATTENTION_ROWS), _Lowest(ATTENTION_ROWS)
    for row in rows:
        view = fleet_row(row, cutoff)
        mode, version = view["mode"], view["version"]
        groups[(mode, version, view["state"], view["target_version"], view["stale"])] += 1
        if live is not None and not same_version(version, live.version):
            buckets[(mode, version, wave_bucket(view["agent_id"], live.rollout.salt))] += 1
        if view["stale"]:
            silent.offer(_stale_key(view), view)
        if view["state"] in FAILURES:
            failing.offer(_failure_key(view), view)
        if view["update_available"] and mode == "container":
            containers.offer(view["agent_id"], view)
    attention = {"stale": silent.rows(), "failures": failing.rows(), "update_available": containers.rows()}
    return FleetPass(rfc3339_ms(epoch_seconds(now)), stale_after, groups, buckets, attention)


def pass_in_store(
    store: ReportStore,
    *,
    now: datetime | float,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    live: Manifest | None = None,
) -> FleetPass:
    """The same pass asked of a store that aggregates (SQLite): counts in SQL, short lists."""
    cutoff = stale_cutoff(now, stale_after)
    groups: Counter[tuple[Any, ...]] = Counter()
    for mode, version, state, target, n, stale in store.count_groups(cutoff):  # type: ignore[attr-defined]
        if stale:
            groups[(mode, version, state, target, True)] += stale
        if n - stale:
            groups[(mode, version, state, target, False)] += n - stale
    buckets: Counter[tuple[Any, ...]] = Counter()
    if live is not None:
        on_live = sorted({v for _, v, *_ in groups if same_version(v, live.version)})
        for agent_id, mode, version in store.agent_versions(excluding=on_live):  # type: ignore[attr-defined]
            buckets[(mode, version, wave_bucket(agent_id, live.rollout.salt))] += 1
    silent = [
        fleet_row(r, cutoff) for r in store.first(Where(seen_before=cutoff), "last_seen", ATTENTION_ROWS)
    ]  # type: ignore[attr-defined]
    failing = [
        fleet_row(r, cutoff) for r in store.first(Where(states=FAILURES), "-last_change", ATTENTION_ROWS)
    ]  # type: ignore[attr-defined]
    containers: list[dict[str, Any]] = []
    if any(g[0] == "container" and _available(g) for g in groups):
        # A superset in SQL (another version as text, no install in progress); the rule decides.
        candidates = Where(mode="container", target_differs=True, not_states=NOT_PENDING)
        for _, row in store.scan(where=candidates):
            view = fleet_row(row, cutoff)
            if view["update_available"] and view["mode"] == "container":
                containers.append(view)
                if len(containers) == ATTENTION_ROWS:
                    break
    attention = {"stale": silent, "failures": failing, "update_available": containers}
    return FleetPass(rfc3339_ms(epoch_seconds(now)), stale_after, groups, buckets, attention)


def fleet_pass(
    store: ReportStore,
    *,
    now: datetime | float,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    live: Manifest | None = None,
) -> FleetPass:
    if store.aggregates:
        return read_or_fail(store, lambda: pass_in_store(store, now=now, stale_after=stale_after, live=live))
    rows = store.scan_all()
    return read_or_fail(store, lambda: pass_over_rows(rows, now=now, stale_after=stale_after, live=live))


def _available(group: tuple[Any, ...]) -> bool:
    _, version, state, target, _ = group
    return update_available({"version": version, "state": state, "target_version": target})


def summarize(done: FleetPass, live: Manifest | None) -> dict[str, Any]:
    """The ``summary`` object of ``/v1/fleet`` (cheap: over the groups only)."""
    by_version: Counter[str] = Counter()
    by_state: Counter[str] = Counter()
    by_mode: Counter[str] = Counter()
    progress: dict[str, Counter[str]] = {mode: Counter() for mode in MODES}
    total = stale = available = failures = containers = 0
    for group, n in done.groups.items():
        mode, version, state, _, is_stale = group
        total += n
        by_version[version] += n
        by_state[state or "-"] += n
        by_mode[mode] += n
        stale += n if is_stale else 0
        failures += n if state in FAILURES else 0
        if _available(group):
            available += n
            containers += n if mode == "container" else 0
        if live is not None and same_version(version, live.version):
            progress.setdefault(mode, Counter())["on_live"] += n
    rollout = None
    if live is not None:
        for (mode, version, bucket), n in done.buckets.items():
            progress.setdefault(mode, Counter())[progress_position(version, bucket, live)] += n
        rollout = {
            "version": live.version,
            "percent": live.rollout.percent,
            **{mode: {k: progress[mode][k] for k in PROGRESS} for mode in MODES},
        }
    rank = {s: i for i, s in enumerate(STATES)}
    return {
        "total": total,
        "by_version": {v: by_version[v] for v in sorted(by_version, key=lambda v: version_key(v or ""))},
        "by_state": {s: by_state[s] for s in sorted(by_state, key=lambda s: (rank.get(s, len(rank)), s))},
        "stale": stale,
        "update_available": available,
        "by_mode": {m: by_mode[m] for m in MODES if by_mode[m]},
        "failures": failures,
        "containers_to_roll": containers,
        "stale_after_s": int(done.stale_after.total_seconds()),
        "computed_at": done.computed_at,
        "rollout": rollout,
        "attention": done.attention,
    }


class SummaryCache:
    """Reuse a whole-fleet pass for ``ttl`` seconds, per stale-after and live version and salt.

    With ``ttl`` 0 every call makes a new pass. Callers wait for one pass instead of each reading
    the fleet; ``passes`` counts the passes made (tests, benchmarks).
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.clock = clock
        self.passes = 0
        self._lock = threading.Lock()
        self._cached: dict[tuple[Any, ...], tuple[float, FleetPass]] = {}

    def summary(self, store: ReportStore, *, stale_after: timedelta, live: Manifest | None) -> dict[str, Any]:
        key = (stale_after, None if live is None else (live.version, live.rollout.salt))
        with self._lock:
            now = self.clock()
            hit = self._cached.get(key)
            if hit is None or self.ttl <= 0 or now - hit[0] >= self.ttl:
                done = fleet_pass(store, now=now, stale_after=stale_after, live=live)
                self.passes += 1
                self._cached = {k: v for k, v in self._cached.items() if now - v[0] < self.ttl}
                self._cached[key] = hit = (now, done)
        return summarize(hit[1], live)
