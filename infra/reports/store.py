"""Where reports go: the storage interface, the ordering rule, and the SQLite store (DESIGN §5).

The decisions live here once: `plan_batch` picks, for each agent, the batch's newest event (the
candidate for its STATE item) and, per `target_version`, its newest lifecycle event (the candidate
for its VERSION# outcome item); `supersedes` says whether a candidate replaces what is stored. A store
only persists: it inserts events idempotently and applies `supersedes` atomically (SQLite inside one
transaction; DynamoDB as a ConditionExpression that encodes the same rule, see `dynamodb.py`).

Ordering ("which event is newest"), per DESIGN §5:
- An event's position is (stream, seq). Within one stream, the higher `seq` wins.
- Between two streams, the higher *stream key* wins (then `seq`). The stream key is the stream id
  (lower case), except that a stream whose embedded creation time is more than 5 minutes ahead of the
  server clock is taken as made when the server received it: its 13 time digits are replaced by the
  receive time in ms. An agent whose clock ran into the future therefore cannot pin its latest state
  forever, and a stream made after it by a corrected clock still wins.
- When a candidate from the stored stream wins, the stored stream key is kept ("pinned"): a future
  stream's key is fixed at the first time it won, so its later events do not keep moving it forward.
  Known limit: an event of a future-stamped stream that is *not* the stored one is keyed by its own
  receive time, so a late straggler from an abandoned future stream can beat a stream made before it
  arrived. That takes a broken clock and a recreated queue at once; pinning every stream's first
  sighting would cost an extra read per batch for all agents to cover it.
Because an equal position never supersedes, re-applying a batch is a no-op: duplicates are offered
again (a retried batch whose first attempt failed half-way still converges) without effect.

Liveness (DESIGN §5): every accepted event moves its agent's `last_seen` (the server's receive
time). A `heartbeat` is liveness, not history: it is never stored as an event, never competes for
the STATE item's lifecycle state and never makes a VERSION# outcome; it only sets `last_seen` and
`last_result` on the STATE item. The one exception is an agent the store has never heard of: its
first heartbeat creates the STATE item (state `heartbeat`), so a quiet, up-to-date agent shows in
the fleet; any later lifecycle event supersedes it. `last_result` is sticky: a newer event that
does not carry one keeps the stored value (`STICKY_FIELDS`).
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .validation import (
    EVENT_FIELDS,
    HEARTBEAT,
    LIFECYCLE_STATES,
    NULLABLE,
    STREAM_TIME_DIGITS,
    stream_time_ms,
    valid_agent_id,
)

if TYPE_CHECKING:
    import sqlite3

DEFAULT_TTL_SECONDS = 30 * 86400
FUTURE_STREAM_SLACK_MS = 5 * 60 * 1000
# Kept on the STATE item when a newer event does not carry them (the last check's result).
STICKY_FIELDS: tuple[str, ...] = ("last_result",)
# What a fleet row is built from (`scan`): the agent's latest state, its liveness, its last change.
STATE_ROW_FIELDS: tuple[str, ...] = (
    "agent_id",
    "mode",
    "platform",
    "version",
    "state",
    "target_version",
    "failed_state",
    "error",
    "image",
    "in_wave",
    "last_result",
    "last_seen",
    "last_change",
)


class StoreError(Exception):
    """The store failed (unreachable, locked): the endpoint answers 503 and the agent retries."""


class StoreThrottled(StoreError):
    """The store pushed back (DynamoDB throttling): the endpoint answers 429."""


# --- ordering -----------------------------------------------------------------------------------


class Position(NamedTuple):
    """Where an event sits in its agent's history; see the module docstring for the rule."""

    stream: str
    stream_key: str
    seq: int


def stream_key(stream: str, received_at: float) -> str:
    """The stream id, with a creation time > 5 min ahead of `received_at` replaced by `received_at`."""
    stream = stream.lower()
    received_ms = int(received_at * 1000)
    if stream_time_ms(stream) > received_ms + FUTURE_STREAM_SLACK_MS:
        return f"{received_ms:0{STREAM_TIME_DIGITS}x}" + stream[STREAM_TIME_DIGITS:]
    return stream


def supersedes(new: Position, old: Position | None) -> bool:
    """True when `new` is strictly newer than `old` (None: nothing stored yet)."""
    if old is None:
        return True
    if new.stream == old.stream:
        return new.seq > old.seq
    return (new.stream_key, new.seq) > (old.stream_key, old.seq)


def pinned(new: Position, old: Position | None) -> Position:
    """The position to store when `new` wins: the stored stream keeps its first stream key."""
    if old is not None and old.stream == new.stream:
        return new._replace(stream_key=old.stream_key)
    return new


# --- planning -----------------------------------------------------------------------------------


def rfc3339_ms(epoch: float) -> str:
    """UTC with milliseconds and a fixed width, so stored times also sort as strings."""
    whole = int(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((epoch - whole) * 1000):03d}Z"


class Candidate(NamedTuple):
    """An event offered to a STATE or VERSION# item: its stored fields and its position."""

    record: dict[str, Any]
    position: Position


class BatchPlan(NamedTuple):
    """Everything one batch writes; stores persist it without further decisions."""

    received_at: str
    received_epoch: int
    expires_at: int
    events: list[dict[str, Any]]  # event records to insert if their (agent_id, event_id) is new
    latest: dict[str, Candidate]  # agent_id -> newest event of the batch that is not a heartbeat
    outcomes: dict[tuple[str, str], Candidate]  # (target_version, agent_id) -> newest lifecycle event
    heartbeats: dict[str, Candidate]  # agent_id -> newest heartbeat of the batch (liveness only)
    accepted: int = 0  # heartbeats: accepted, never stored, so never counted as duplicates


def _record(event: dict[str, Any], received_at: str) -> dict[str, Any]:
    """The stored form of a validated event: nulls omitted (absent reads back as null)."""
    record = {name: event[name] for name in EVENT_FIELDS if event.get(name) is not None}
    record["received_at"] = received_at
    return record


def plan_batch(events: Sequence[dict[str, Any]], received_at: float, ttl_seconds: int) -> BatchPlan:
    """Decide what a batch of validated events writes (pure)."""
    received = rfc3339_ms(received_at)
    latest: dict[str, Candidate] = {}
    outcomes: dict[tuple[str, str], Candidate] = {}
    heartbeats: dict[str, Candidate] = {}
    records = []
    for event in events:
        record = _record(event, received)
        position = Position(event["stream"], stream_key(event["stream"], received_at), event["seq"])
        candidate = Candidate(record, position)
        agent_id = event["agent_id"]
        newest = heartbeats if event["state"] == HEARTBEAT else latest
        current = newest.get(agent_id)
        if current is None or supersedes(position, current.position):
            newest[agent_id] = candidate
        if event["state"] == HEARTBEAT:
            continue  # liveness, not history: no event item, no outcome
        records.append(record)
        # Only an install attempt has an outcome; `checking`/`update_available` never do.
        if event["state"] in LIFECYCLE_STATES and event.get("target_version") is not None:
            key = (event["target_version"], agent_id)
            current = outcomes.get(key)
            if current is None or supersedes(position, current.position):
                outcomes[key] = candidate
    return BatchPlan(
        received,
        int(received_at),
        int(received_at) + ttl_seconds,
        records,
        latest,
        outcomes,
        heartbeats,
        len(events) - len(records),
    )


def public_record(raw: dict[str, Any], *extra: str) -> dict[str, Any]:
    """A stored item as callers see it: every event field (absent nullable = None) plus `extra`."""
    out = {name: raw[name] for name in EVENT_FIELDS if name in raw}
    for name in NULLABLE:
        out.setdefault(name, None)
    out["received_at"] = raw.get("received_at")
    for name in extra:
        out[name] = raw.get(name)
    return out


# --- interface ----------------------------------------------------------------------------------


class Where(NamedTuple):
    """Exact filters a store may apply itself while scanning; callers still check every row."""

    state: str | None = None
    mode: str | None = None
    seen_before: str | None = None  # last_seen < this (RFC 3339 with ms, as stored: sorts as text)
    states: tuple[str, ...] | None = None  # state is one of these
    not_states: tuple[str, ...] = ()  # state is none of these
    target_differs: bool = False  # target_version is set and is not, as text, the version


ANYWHERE = Where()


class ReportStore(ABC):
    """One interface over SQLite and DynamoDB; `put_events` plans once, `_persist` writes.

    Reads for the fleet view (`scan`) never touch events. `summary_ttl` is how long a whole-fleet
    summary may be reused before it is computed again (0: every time; DynamoDB reads the whole
    fleet for it, so it caches); `scan_budget` bounds the rows one filtered page may examine.
    """

    ttl_seconds: int = DEFAULT_TTL_SECONDS
    summary_ttl: float = 0.0
    scan_budget: int | None = None
    # SQLite answers the summary's questions in SQL (`count_groups`, `agent_versions`, `first`);
    # a store without them is summarised from one pass over `scan_all`.
    aggregates: bool = False

    @staticmethod
    def from_url(url: str, *, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> ReportStore:
        """`sqlite:///relative.db`, `sqlite:////absolute/path.db` or `dynamodb://table-name`."""
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            return SQLiteStore(url[len("sqlite:///") :], ttl_seconds=ttl_seconds)
        if url.startswith("dynamodb://"):
            table = url[len("dynamodb://") :]
            if not table or "/" in table:
                raise ValueError(f"bad DynamoDB reports URL {url!r}: expected dynamodb://TABLE")
            from .dynamodb import DynamoDBStore  # boto3 only when DynamoDB is asked for

            return DynamoDBStore(table, ttl_seconds=ttl_seconds)
        raise ValueError(f"unsupported reports URL {url!r}: use sqlite:///PATH or dynamodb://TABLE")

    def put_events(self, events: Sequence[dict[str, Any]], received_at: float) -> tuple[int, int]:
        """Store validated events received at `received_at` (epoch s); returns (accepted, duplicates)."""
        plan = plan_batch(events, received_at, self.ttl_seconds)
        accepted = self._persist(plan) + plan.accepted
        return accepted, len(events) - accepted

    @abstractmethod
    def _persist(self, plan: BatchPlan) -> int:
        """Write `plan`; return how many of its stored (non-heartbeat) events were new."""

    @abstractmethod
    def agents(self) -> Iterator[dict[str, Any]]:
        """Every agent's latest state (event fields, `received_at`, `last_seen`, `last_change`)."""

    @abstractmethod
    def agent(self, agent_id: str) -> dict[str, Any] | None:
        """One agent's latest state, or None."""

    @abstractmethod
    def version_outcomes(self, version: str) -> list[dict[str, Any]]:
        """Each agent's latest lifecycle event for an attempt at `version` (keyed as sent)."""

    @abstractmethod
    def agent_events(self, agent_id: str) -> list[dict[str, Any]]:
        """The agent's stored events (with `received_at`, `expires_at`), for audits and tests.

        Expired events may linger until purged, as DynamoDB's TTL deletes lazily.
        """

    @abstractmethod
    def scan(
        self, after: str | None = None, where: Where = ANYWHERE, page_size: int = 1000
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(position, row) for every agent after `after`, in a stable store order.

        A row holds `STATE_ROW_FIELDS`; a position resumes the scan just after its row (ValueError
        for one this store did not make). `where` may be applied by the store; rows that fail it
        may still come back, so callers filter again.
        """

    def scan_all(self) -> Iterator[dict[str, Any]]:
        """Every agent's row, for a whole-fleet summary (a store may read in parallel)."""
        return (row for _, row in self.scan())

    @abstractmethod
    def put_audit(self, entry: dict[str, Any]) -> None:
        """Record an operator action (JSON-able values; `time` RFC 3339 is required)."""

    @abstractmethod
    def audit(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest `limit` operator actions, newest first."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


from_url = ReportStore.from_url


def state_row(values: dict[str, Any]) -> dict[str, Any]:
    """A scan row: `STATE_ROW_FIELDS`, absent ones None, `in_wave` a bool or None."""
    row = {name: values.get(name) for name in STATE_ROW_FIELDS}
    if row["in_wave"] is not None:
        row["in_wave"] = bool(row["in_wave"])
    return row


# --- SQLite -------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    agent_id TEXT NOT NULL, event_id TEXT NOT NULL,
    received_at TEXT NOT NULL, expires_at INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (agent_id, event_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_expiry ON events (expires_at);
CREATE TABLE IF NOT EXISTS agent_state (
    agent_id TEXT PRIMARY KEY, stream TEXT NOT NULL, stream_key TEXT NOT NULL, seq INTEGER NOT NULL,
    last_seen TEXT NOT NULL, data TEXT NOT NULL,
    mode TEXT, platform TEXT, version TEXT, state TEXT, target_version TEXT, failed_state TEXT,
    error TEXT, image TEXT, in_wave INTEGER, last_result TEXT, last_change TEXT);
CREATE TABLE IF NOT EXISTS version_outcomes (
    version TEXT NOT NULL, agent_id TEXT NOT NULL,
    stream TEXT NOT NULL, stream_key TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL,
    state TEXT, PRIMARY KEY (version, agent_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, data TEXT NOT NULL);
"""
# agent_state columns beside `data` (the winning event's record), so the fleet view filters, pages
# and summarises in SQL without decoding JSON (and version_outcomes.state for the canary's counts);
# databases made before them get them on open (`_migrate`).
# `last_change` is the winning event's receive time; `last_result` is sticky (STICKY_FIELDS).
_STATE_COLUMNS = tuple(f for f in STATE_ROW_FIELDS if f not in ("agent_id", "last_seen"))
_SCAN_COLUMNS = ("agent_id", *_STATE_COLUMNS, "last_seen")
_UPSERT_STATE = (
    "INSERT INTO agent_state (agent_id, stream, stream_key, seq, last_seen, data, "
    + ", ".join(_STATE_COLUMNS)
    + ") VALUES ("
    + ", ".join("?" * (6 + len(_STATE_COLUMNS)))
    + ") ON CONFLICT(agent_id) DO UPDATE SET stream = excluded.stream, stream_key = excluded.stream_key,"
    " seq = excluded.seq, last_seen = max(agent_state.last_seen, excluded.last_seen), data = excluded.data, "
    + ", ".join(
        f"{c} = coalesce(excluded.{c}, agent_state.{c})" if c in STICKY_FIELDS else f"{c} = excluded.{c}"
        for c in _STATE_COLUMNS
    )
)


# What the console's summary asks (`count_groups`, `first`): answered from indexes, not a sort of
# every row. Made after the columns exist (`_migrate`).
_STATE_INDEXES = """
CREATE INDEX IF NOT EXISTS agent_state_groups
    ON agent_state (mode, version, state, target_version, last_seen);
CREATE INDEX IF NOT EXISTS agent_state_seen ON agent_state (last_seen);
CREATE INDEX IF NOT EXISTS agent_state_changes ON agent_state (state, last_change);
CREATE INDEX IF NOT EXISTS version_outcome_states ON version_outcomes (version, state);
"""


def _state_values(record: dict[str, Any]) -> tuple[Any, ...]:
    values = {**record, "last_change": record.get("received_at")}
    return tuple(values.get(c) for c in _STATE_COLUMNS)


class SQLiteStore(ReportStore):
    """The local store (`avika-publish serve`): tables mirror the DynamoDB items.

    One connection guarded by a lock, so a threaded HTTP server can share the store; WAL lets the
    publisher's `fleet` read the file from another process while the server writes.
    """

    def __init__(self, path: str | Path, *, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        import sqlite3  # not needed by the Lambda, so kept off its import path

        self.path = str(path)
        self.ttl_seconds = ttl_seconds
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write never upgrades a read lock.
        self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a 202 means the events survive a power cut
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._db.executescript(_STATE_INDEXES)

    def _migrate(self) -> None:
        """Add the state columns to a database made before them, filled from each row's record."""
        if not self._missing_columns():
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            missing = self._missing_columns()  # another process may have migrated meanwhile
            for table, column in missing:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            for table in sorted({t for t, _ in missing}):
                sets = ", ".join(
                    f"{c} = json_extract(data, '$.{'received_at' if c == 'last_change' else c}')"
                    for t, c in missing
                    if t == table
                )
                self._db.execute(f"UPDATE {table} SET {sets}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _missing_columns(self) -> list[tuple[str, str]]:
        missing = []
        for table, columns in (("agent_state", _STATE_COLUMNS), ("version_outcomes", ("state",))):
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            missing += [(table, c) for c in columns if c not in have]
        return missing

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except self._errors as exc:
                raise StoreError(f"sqlite: {exc}") from exc

    def _transaction(self, work: Any, *args: Any) -> Any:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(self._db, *args)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except self._errors as exc:
                raise StoreError(f"sqlite: {exc}") from exc

    def _persist(self, plan: BatchPlan) -> int:
        return self._transaction(self._write, plan)

    @staticmethod
    def _write(db: sqlite3.Connection, plan: BatchPlan) -> int:
        # What DynamoDB's TTL does, by the same (server receive) clock.
        db.execute("DELETE FROM events WHERE expires_at <= ?", (plan.received_epoch,))
        accepted = 0
        for record in plan.events:
            cur = db.execute(
                "INSERT OR IGNORE INTO events (agent_id, event_id, received_at, expires_at, data)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    record["agent_id"],
                    record["event_id"],
                    plan.received_at,
                    plan.expires_at,
                    json.dumps(record),
                ),
            )
            accepted += cur.rowcount
        for agent_id, cand in plan.latest.items():
            row = db.execute(
                "SELECT stream, stream_key, seq FROM agent_state WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            old = Position(*row) if row else None
            if supersedes(cand.position, old):
                SQLiteStore._put_state(db, agent_id, pinned(cand.position, old), plan.received_at, cand)
            else:  # an older or replayed event still proves the agent is alive
                db.execute(
                    "UPDATE agent_state SET last_seen = max(last_seen, ?) WHERE agent_id = ?",
                    (plan.received_at, agent_id),
                )
        for agent_id, beat in plan.heartbeats.items():
            cur = db.execute(
                "UPDATE agent_state SET last_seen = max(last_seen, ?), last_result = coalesce(?, last_result)"
                " WHERE agent_id = ?",
                (plan.received_at, beat.record.get("last_result"), agent_id),
            )
            if cur.rowcount == 0:  # never heard of: the heartbeat makes its first STATE
                SQLiteStore._put_state(db, agent_id, beat.position, plan.received_at, beat)
        for (version, agent_id), cand in plan.outcomes.items():
            row = db.execute(
                "SELECT stream, stream_key, seq FROM version_outcomes WHERE version = ? AND agent_id = ?",
                (version, agent_id),
            ).fetchone()
            old = Position(*row) if row else None
            if supersedes(cand.position, old):
                pos = pinned(cand.position, old)
                db.execute(
                    "INSERT OR REPLACE INTO version_outcomes"
                    " (version, agent_id, stream, stream_key, seq, data, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        version,
                        agent_id,
                        pos.stream,
                        pos.stream_key,
                        pos.seq,
                        json.dumps(cand.record),
                        cand.record["state"],
                    ),
                )
        return accepted

    @staticmethod
    def _put_state(
        db: sqlite3.Connection, agent_id: str, pos: Position, received_at: str, cand: Candidate
    ) -> None:
        db.execute(
            _UPSERT_STATE,
            (
                agent_id,
                pos.stream,
                pos.stream_key,
                pos.seq,
                received_at,
                json.dumps(cand.record),
                *_state_values(cand.record),
            ),
        )

    @staticmethod
    def _full(last_seen: str, last_result: str | None, last_change: str | None, data: str) -> dict[str, Any]:
        raw = json.loads(data)
        raw.update(last_seen=last_seen, last_change=last_change or raw.get("received_at"))
        raw["last_result"] = last_result if last_result is not None else raw.get("last_result")
        return public_record(raw, "last_seen", "last_change")

    def agents(self) -> Iterator[dict[str, Any]]:
        rows = self._query(
            "SELECT last_seen, last_result, last_change, data FROM agent_state ORDER BY agent_id"
        )
        for row in rows:
            yield self._full(*row)

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT last_seen, last_result, last_change, data FROM agent_state WHERE agent_id = ?",
            (agent_id,),
        )
        return self._full(*rows[0]) if rows else None

    @staticmethod
    def _where(where: Where) -> tuple[list[str], list[Any]]:
        clauses, args = [], []
        for column, value in (("state", where.state), ("mode", where.mode)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if where.seen_before is not None:
            clauses.append("last_seen < ?")
            args.append(where.seen_before)
        if where.states is not None:
            clauses.append(f"state IN ({', '.join('?' * len(where.states))})" if where.states else "0")
            args.extend(where.states)
        if where.not_states:
            clauses.append(f"state NOT IN ({', '.join('?' * len(where.not_states))})")
            args.extend(where.not_states)
        if where.target_differs:
            clauses.append("target_version IS NOT NULL AND target_version <> version")
        return clauses, args

    def scan(
        self, after: str | None = None, where: Where = ANYWHERE, page_size: int = 1000
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        clauses, args = self._where(where)
        sql = (
            f"SELECT {', '.join(_SCAN_COLUMNS)} FROM agent_state WHERE agent_id > ?"
            + "".join(f" AND {c}" for c in clauses)
            + " ORDER BY agent_id LIMIT ?"
        )
        if after is not None and not valid_agent_id(after):
            raise ValueError(f"not a scan position of this store: {after[:40]!r}")
        position = after or ""
        while True:
            rows = self._query(sql, (position, *args, page_size))
            for values in rows:
                yield values[0], state_row({name: values[i] for i, name in enumerate(_SCAN_COLUMNS)})
            if len(rows) < page_size:
                return
            position = rows[-1][0]

    aggregates = True

    def count_groups(self, seen_before: str) -> list[tuple[Any, ...]]:
        """(mode, version, state, target_version, agents, of them last seen before) for the fleet."""
        return self._query(
            "SELECT mode, version, state, target_version, count(*), sum(last_seen < ?) FROM agent_state"
            " GROUP BY mode, version, state, target_version",
            (seen_before,),
        )

    def agent_versions(self, excluding: Sequence[str] = ()) -> Iterator[tuple[str, str, str]]:
        """(agent_id, mode, version) of every agent whose version is none of ``excluding``."""
        marks = ", ".join("?" * len(excluding))
        sql = "SELECT agent_id, mode, version FROM agent_state" + (
            f" WHERE version NOT IN ({marks})" if marks else ""
        )
        yield from self._query(sql, tuple(excluding))

    _ORDERS = {"last_seen": "last_seen", "-last_change": "last_change DESC", "agent_id": "agent_id"}

    def first(self, where: Where, order: str, limit: int) -> list[dict[str, Any]]:
        """The first ``limit`` rows matching ``where`` in ``order`` (see ``_ORDERS``)."""
        clauses, args = self._where(where)
        sql = (
            f"SELECT {', '.join(_SCAN_COLUMNS)} FROM agent_state"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + f" ORDER BY {self._ORDERS[order]}, agent_id LIMIT ?"
        )
        return [
            state_row({name: values[i] for i, name in enumerate(_SCAN_COLUMNS)})
            for values in self._query(sql, (*args, limit))
        ]

    def outcome_counts(self, version: str) -> dict[str, int]:
        """Agents per state of their latest attempt at ``version`` (the canary's counts, in SQL)."""
        rows = self._query(
            "SELECT state, count(*) FROM version_outcomes WHERE version = ? GROUP BY state", (version,)
        )
        return {state: n for state, n in rows}

    def outcomes_in(self, version: str, states: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """The first ``limit`` outcomes at ``version`` in one of ``states``, by agent id."""
        rows = self._query(
            "SELECT data FROM version_outcomes WHERE version = ?"
            f" AND state IN ({', '.join('?' * len(states))}) ORDER BY agent_id LIMIT ?",
            (version, *states, limit),
        )
        return [public_record(json.loads(data)) for (data,) in rows]

    def version_outcomes(self, version: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT data FROM version_outcomes WHERE version = ? ORDER BY agent_id", (version,)
        )
        return [public_record(json.loads(data)) for (data,) in rows]

    def agent_events(self, agent_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT expires_at, data FROM events WHERE agent_id = ? ORDER BY event_id", (agent_id,)
        )
        return [public_record({**json.loads(data), "expires_at": exp}, "expires_at") for exp, data in rows]

    def put_audit(self, entry: dict[str, Any]) -> None:
        self._transaction(
            lambda db: db.execute(
                "INSERT INTO audit (time, data) VALUES (?, ?)", (entry["time"], json.dumps(entry))
            )
        )

    def audit(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._query("SELECT data FROM audit ORDER BY seq DESC LIMIT ?", (limit,))
        return [json.loads(data) for (data,) in rows]
