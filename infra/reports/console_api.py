"""The operator API (DESIGN section 9, contract): routes over the fleet queries and the re-sign.

Transport-free like `core.py`: a `Request` and the caller's `Principal` (or None) in, an `Answer`
out. `avika-publish serve --console` (local tokens) and the Lambda (`console_lambda.py`, JWT claims)
both call `ConsoleAPI.respond`; neither adds rules. The routes are thin: what an agent row, a
page, a summary, "stale", "update available" and the canary verdict are is decided once, in
`publisher/fleet.py`; an action is `publisher/steer.py`.

    GET  /v1/fleet            read     a page of agents + whole-fleet summary + live release
    GET  /v1/agents/{id}      read     one agent and its history (newest 200 events, oldest first)
    GET  /v1/releases         read     live release, archived serials, canary verdict, audit
    POST /v1/rollout          operate  {"percent": N}, If-Match: "<serial>"
    POST /v1/halt             operate  If-Match: "<serial>"

Checks, in order: route (404) and method (405, `Allow`); credentials (401, `WWW-Authenticate`);
scope (403); query and body (400); for actions `If-Match` (428 without it, 400 malformed, 412 when
the live serial moved); then the work. GETs carry an `ETag` (a digest of the body) and answer 304
to a matching `If-None-Match`, so a console polling every 5 s moves bytes only when something
changed. Every answer is JSON (`{"error": CODE, "message": ...}` for errors) with
`Cache-Control: no-store`. Every action that reaches the store is audited (who, what, serial
before and after, time) in the reports store and listed by `/v1/releases`.

This module is imported only for console routes: the Lambda's `/v1/reports` cold start never
pays for the publisher, cryptography or packaging it needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

from agent.config import parse_duration
from agent.manifest import Manifest, PublicKey, Signer
from publisher import fleet, fleet_summary, steer
from publisher import release as publishing
from publisher.errors import PublishError, Refused, VerificationFailed
from publisher.resign import NoLiveRelease
from publisher.stores import Store

from .console_auth import OPERATE, READ, Principal
from .console_routes import AGENTS_PREFIX, FLEET_PATH, HALT_PATH, RELEASES_PATH, ROLLOUT_PATH
from .store import ReportStore, StoreError, rfc3339_ms
from .validation import ValidationError, loads_strict, valid_agent_id

LOG = logging.getLogger("avika.reports.console")

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_BODY_BYTES = 4096
AUDIT_ENTRIES = 50
HISTORY_ROWS = 50
DEFAULT_MAX_FAILURE_RATE = 0.05
DEFAULT_MIN_AGENTS = 20
_IF_MATCH_RE = re.compile(r'\s*(?:W/)?"([0-9]{1,16})"\s*')


class Request(NamedTuple):
    method: str
    path: str  # raw (percent-encoded) path
    query: str  # raw query string
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""


class Answer(NamedTuple):
    """Status, JSON body (None: no body, e.g. 304) and extra headers."""

    status: int
    body: dict[str, Any] | None
    headers: Mapping[str, str] | None = None

    def encoded(self) -> bytes:
        if self.body is None:
            return b""
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")

    def all_headers(self) -> dict[str, str]:
        base = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
        if self.body is not None:
            base["Content-Type"] = "application/json"
        return {**base, **(self.headers or {})}


class _Problem(Exception):
    """An error answer raised from deep inside a route."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.answer = problem(status, code, message, **extra)


def problem(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> Answer:
    return Answer(status, {"error": code, "message": message, **extra}, headers)


def etag_of(body: dict[str, Any]) -> str:
    """A digest of what the body says; when a summary was computed is not part of it."""
    summary = body.get("summary")
    if isinstance(summary, dict) and "computed_at" in summary:
        body = {**body, "summary": {k: v for k, v in summary.items() if k != "computed_at"}}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return f'"{digest.hexdigest()[:32]}"'


def etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in (t.removeprefix("W/") for t in tags)


# ---------------------------------------------------------------- the release store


@dataclass
class Releases:
    """The publisher's side: the store, who signs (made on first use: KMS), keys to trust, the CDN."""

    store: Store
    signers: Callable[[], Sequence[Signer]] | None = None
    public_keys: Sequence[PublicKey] = ()
    invalidate: publishing.Invalidate | None = None
    _signers: list[Signer] | None = field(default=None, init=False, repr=False)

    @property
    def can_sign(self) -> bool:
        return self.signers is not None

    def signing(self) -> list[Signer]:
        if self.signers is None:
            raise _Problem(503, "not_configured", "this console has no signing key: it can show, not act")
        if self._signers is None:
            self._signers = list(self.signers())
        return self._signers

    def trusted(self) -> list[PublicKey]:
        keys = list(self.public_keys)
        if self.signers is not None:
            keys += [s.public_key for s in self.signing()]
        return list(dict.fromkeys(keys))

    def live(self) -> tuple[Manifest | None, bool | None]:
        return steer.live_release(self.store, self.trusted())


class _TimedCache:
    """Values kept for `ttl` seconds by key (0: never kept)."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl, self.clock = ttl, clock
        self._lock = threading.Lock()
        self._values: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._lock:
            hit = self._values.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
        value = make()
        if self.ttl > 0:
            with self._lock:
                self._values = {k: v for k, v in self._values.items() if now - v[0] < self.ttl}
                self._values[key] = (now, value)
        return value


# ---------------------------------------------------------------- query parsing

Query = Mapping[str, Sequence[str]]


def parse_query(raw: str) -> dict[str, list[str]]:
    """A query string as lists of values (blank values kept, so `state=` is refused, not ignored)."""
    if len(raw) > 4096:
        raise _Problem(400, "bad_request", "query string too long")
    try:
        return parse_qs(raw, keep_blank_values=True, max_num_fields=32, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise _Problem(400, "bad_request", "malformed query string") from None


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _Problem(400, "bad_request", f"{name}: give it once")
    return values[0]


def _check_params(query: Mapping[str, Sequence[str]], allowed: Sequence[str]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise _Problem(
            400, "bad_request", f"unknown query parameter {unknown[0]!r}; known: {', '.join(allowed)}"
        )


def _bool(query: Mapping[str, Sequence[str]], name: str) -> bool | None:
    value = _one(query, name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise _Problem(400, "bad_request", f"{name}: true or false, not {value[:40]!r}")
    return value == "true"


def _int(query: Mapping[str, Sequence[str]], name: str, default: int, low: int, high: int) -> int:
    value = _one(query, name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise _Problem(400, "bad_request", f"{name}: a whole number from {low} to {high}")
    return int(value)


def _rate(query: Mapping[str, Sequence[str]], name: str, default: float) -> float:
    value = _one(query, name)
    if value is None:
        return default
    try:
        rate = float(value)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0 or len(value) > 12:
        raise _Problem(400, "bad_request", f"{name}: a share from 0 to 1 (0.05 = 5 %)")
    return rate


def _duration(query: Mapping[str, Sequence[str]], name: str, default: timedelta) -> timedelta:
    value = _one(query, name)
    if value is None:
        return default
    try:
        seconds = parse_duration(value[:32])
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise _Problem(400, "bad_request", f"{name}: a duration such as 30m, 3h or 1d12h")
    return timedelta(seconds=seconds)


FLEET_PARAMS = ("stale_after", "state", "version", "mode", "stale", "update_available", "limit", "cursor")
RELEASES_PARAMS = ("max_failure_rate", "min_agents")


# ---------------------------------------------------------------- the API


class ConsoleAPI:
    """The operator API over a reports store and (optionally) the release store."""

    def __init__(
        self,
        reports: ReportStore,
        releases: Releases | None = None,
        *,
        clock: Callable[[], float] = time.time,
        summary_ttl: float | None = None,
    ) -> None:
        ttl = reports.summary_ttl if summary_ttl is None else summary_ttl
        self.reports = reports
        self.releases = releases
        self.clock = clock
        self.summaries = fleet_summary.SummaryCache(ttl, clock)
        self._slow = _TimedCache(ttl, clock)  # history and canary: full reads of their own

    # -- dispatch

    def respond(self, request: Request, principal: Principal | None) -> Answer:
        """The answer to one request; never raises (an unexpected error is a logged 500)."""
        try:
            return self._respond(request, principal)
        except _Problem as exc:
            return exc.answer
        except Exception:
            LOG.exception("unexpected error in the console API")
            return problem(500, "internal", "internal error")

    def _route(self, request: Request) -> tuple[str, str, Callable[..., Answer]]:
        """(method wanted, scope, handler) for the path, or a 404."""
        path = request.path
        if path == FLEET_PATH:
            return "GET", READ, self._fleet
        if path == RELEASES_PATH:
            return "GET", READ, self._releases
        if path.startswith(AGENTS_PREFIX):
            return "GET", READ, self._agent
        if path == ROLLOUT_PATH:
            return "POST", OPERATE, self._rollout
        if path == HALT_PATH:
            return "POST", OPERATE, self._halt
        raise _Problem(404, "not_found", f"no such route: {path[:100]}")

    def _respond(self, request: Request, principal: Principal | None) -> Answer:
        wanted, scope, handler = self._route(request)
        query = parse_query(request.query)
        method = request.method.upper()
        if method != wanted and not (wanted == "GET" and method == "HEAD"):
            return problem(405, "method_not_allowed", f"use {wanted}", {"Allow": wanted})
        if principal is None:
            return problem(
                401,
                "unauthorized",
                "missing or invalid credentials: send Authorization: Bearer <console token>",
                {"WWW-Authenticate": 'Bearer realm="avika-console"'},
            )
        if not principal.can(scope):
            return problem(403, "forbidden", f"this needs the {scope!r} scope; {principal.who!r} lacks it")
        answer = handler(request, query, principal)
        if wanted == "GET" and answer.status == 200 and answer.body is not None:
            tag = etag_of(answer.body)
            if etag_matches(request.headers.get("if-none-match"), tag):
                return Answer(304, None, {"ETag": tag})
            answer = answer._replace(headers={**(answer.headers or {}), "ETag": tag})
        return answer

    def _now(self) -> float:
        return self.clock()

    def _live(self) -> tuple[Manifest | None, bool | None, str | None]:
        """The live release, whether it verifies, and why it could not be read (or None)."""
        if self.releases is None:
            return None, None, None
        try:
            manifest, verified = self.releases.live()
        except PublishError as exc:
            return None, None, exc.message
        return manifest, verified, None

    def _reports(self, what: Callable[[], Any]) -> Any:
        try:
            return what()
        except Refused:
            raise
        except (StoreError, PublishError) as exc:
            LOG.error("reports store failed: %s", exc)
            raise _Problem(503, "unavailable", "the reports store is unavailable; retry") from None

    # -- reads

    def _fleet(self, request: Request, q: Query, principal: Principal) -> Answer:
        _check_params(q, FLEET_PARAMS)
        stale_after = _duration(q, "stale_after", fleet.DEFAULT_STALE_AFTER)
        limit = _int(q, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        try:
            where = fleet.FleetFilter(
                state=_one(q, "state"),
                version=_one(q, "version"),
                mode=_one(q, "mode"),
                stale=_bool(q, "stale"),
                update_available=_bool(q, "update_available"),
            )
        except Refused as exc:
            raise _Problem(400, "bad_request", exc.message) from None
        live, verified, release_error = self._live()
        now = self._now()
        try:
            agents, after = self._reports(
                lambda: fleet.fleet_page(
                    self.reports,
                    limit=limit,
                    cursor=_one(q, "cursor"),
                    now=now,
                    stale_after=stale_after,
                    where=where,
                )
            )
        except Refused as exc:
            raise _Problem(400, "bad_request", exc.message) from None
        summary = self._reports(
            lambda: self.summaries.summary(self.reports, stale_after=stale_after, live=live)
        )
        body: dict[str, Any] = {
            "agents": agents,
            "versions": fleet.counts_by_version(agents),
            "summary": summary,
        }
        if self.releases is not None:
            body["release"] = fleet.release_view(live, verified=verified)
            if release_error:
                body["release_error"] = release_error
        if after is not None:
            body["next"] = after
        return Answer(200, body)

    def _agent(self, request: Request, q: Query, principal: Principal) -> Answer:
        _check_params(q, ())
        agent_id = unquote(request.path[len(AGENTS_PREFIX) :], errors="replace")
        if not valid_agent_id(agent_id):
            raise _Problem(400, "bad_request", "agent id: 1-128 characters of A-Z a-z 0-9 . _ : @ / + = -")
        found = self._reports(
            lambda: fleet.agent_history(
                self.reports, agent_id, now=self._now(), limit=fleet.MAX_HISTORY_EVENTS
            )
        )
        if found is None:
            raise _Problem(404, "not_found", f"no reports from agent {agent_id!r}")
        return Answer(200, found)

    def _releases(self, request: Request, q: Query, principal: Principal) -> Answer:
        _check_params(q, RELEASES_PARAMS)
        if self.releases is None:
            raise _Problem(503, "not_configured", "this console has no release store")
        live, verified, release_error = self._live()
        if release_error:
            raise _Problem(503, "unavailable", release_error)
        # The canary's thresholds: the query's, else the release's own plan's, else DESIGN's defaults.
        plan = None if live is None else live.rollout_plan
        max_rate = _rate(
            q, "max_failure_rate", float(plan.max_failure_rate) if plan else DEFAULT_MAX_FAILURE_RATE
        )
        min_agents = _int(q, "min_agents", plan.min_agents if plan else DEFAULT_MIN_AGENTS, 1, 1_000_000)
        serial = None if live is None else live.serial
        history = self._slow.get(("history", serial), self._history)
        canary = None
        if live is not None:
            version = live.version
            canary = self._slow.get(
                ("canary", version, max_rate, min_agents),
                lambda: self._reports(
                    lambda: fleet.canary_view(
                        self.reports, version, max_failure_rate=max_rate, min_agents=min_agents
                    )
                ),
            )
        audit = self._reports(lambda: self.reports.audit(AUDIT_ENTRIES))
        return Answer(
            200,
            {
                "live": fleet.release_view(live, verified=verified),
                "history": history,
                "canary": canary,
                "audit": audit,
                "session": {**principal.to_json(), "can_sign": self.releases.can_sign},
            },
        )

    def _history(self) -> list[dict[str, Any]]:
        assert self.releases is not None
        try:
            return steer.history(self.releases.store, self.releases.trusted())[:HISTORY_ROWS]
        except PublishError as exc:
            raise _Problem(503, "unavailable", exc.message) from None

    # -- actions

    def _rollout(self, request: Request, q: Query, principal: Principal) -> Answer:
        body = self._body(request, q, required={"percent"})
        percent = body["percent"]
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 100:
            raise _Problem(400, "bad_request", "percent: a whole number from 0 to 100")
        return self._act(request, principal, "rollout", percent)

    def _halt(self, request: Request, q: Query, principal: Principal) -> Answer:
        self._body(request, q, required=set())
        return self._act(request, principal, "halt", 0)

    def _body(self, request: Request, q: Query, *, required: set[str]) -> dict[str, Any]:
        _check_params(q, ())
        if len(request.body) > MAX_BODY_BYTES:
            raise _Problem(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
        if not request.body.strip() and not required:
            return {}
        try:
            doc = loads_strict(request.body)
        except ValidationError as exc:
            raise _Problem(400, "bad_request", exc.reason) from None
        if not isinstance(doc, dict):
            raise _Problem(400, "bad_request", "body must be a JSON object")
        extra = sorted(set(doc) - required)
        if extra:
            raise _Problem(400, "bad_request", f"unexpected field {extra[0]!r}")
        missing = sorted(required - set(doc))
        if missing:
            raise _Problem(400, "bad_request", f"{missing[0]}: is required")
        return doc

    def _act(self, request: Request, principal: Principal, action: str, percent: int) -> Answer:
        header = request.headers.get("if-match")
        if header is None:
            return problem(
                428,
                "precondition_required",
                'send If-Match: "<serial>" with the serial of the release you are looking at',
            )
        m = _IF_MATCH_RE.fullmatch(header)
        if m is None:
            raise _Problem(400, "bad_request", 'If-Match: the quoted serial of the live release, e.g. "42"')
        expected = int(m.group(1))
        if self.releases is None:
            raise _Problem(503, "not_configured", "this console has no release store")
        releases = self.releases
        try:
            done = steer.steer(
                releases.store,
                releases.signing(),
                percent=percent,
                expect_serial=expected,
                trusted=releases.public_keys,
                invalidate=releases.invalidate,
            )
        except steer.SerialMoved as exc:
            try:
                moved, _ = steer.live_release(releases.store)
            except PublishError:
                moved = None
            return problem(
                412,
                "precondition_failed",
                exc.message,
                live_serial=exc.live_serial,
                live_version=None if moved is None else moved.version,
            )
        except NoLiveRelease as exc:
            raise _Problem(409, exc.code, exc.message) from None
        except VerificationFailed as exc:
            raise _Problem(409, exc.code, exc.message) from None
        except Refused as exc:
            raise _Problem(409, "refused", exc.message) from None
        except PublishError as exc:
            LOG.error("console %s failed: %s", action, exc.message)
            raise _Problem(503, "unavailable", exc.message) from None
        entry = {
            "time": rfc3339_ms(self._now()),
            "who": principal.who,
            "action": action,
            "percent": percent,
            "version": done.version,
            "serial_before": done.serial_before,
            "serial_after": done.serial_after,
            "status": done.status,
        }
        body = done.to_json()
        try:
            self.reports.put_audit(entry)
        except (StoreError, PublishError) as exc:  # the action happened: say so, and that it is unrecorded
            LOG.error("console action not audited: %s: %s", entry, exc)
            body["audit_error"] = "the action was done but could not be recorded in the audit log"
        LOG.info("console action", extra={"fields": entry})
        return Answer(200, body, {"ETag": f'"{done.serial_after}"'})
