"""The reports endpoint without HTTP plumbing (DESIGN §5): method, headers, body, clock in; answer out.

The Lambda (`handler.py`) and `avika-publish serve` both call `ReportsEndpoint`; neither adds rules.
Checks, in the contract's order (the first failure is the answer):

1. only POST (405, with `Allow: POST`);
2. body over 256 KiB (413);
3. missing or malformed `Authorization: Bearer <64 hex>` (401);
4. body not strict UTF-8 JSON holding an object with 1-100 `events` objects, or an invalid
   `agent_id` (400);
5. the token matches no event's `agent_id` under the current or previous secret (401) - checked
   before the other fields so an unauthenticated caller learns nothing about them;
6. any other invalid field (400, the reason names the field and the event index);
7. else store and answer 202 `{"accepted": n, "duplicates": m}` (replayed event ids are duplicates).
A store that pushes back is 429, one that fails 503 (the agent keeps its events and retries); an
unexpected error is a logged 500, never a traceback to the client.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from .auth import bearer_token, token_matches
from .store import ReportStore, StoreError, StoreThrottled
from .validation import MAX_BODY_BYTES, ValidationError, parse_batch, validate_events

# Every status `respond` can return (the hypothesis test holds it to this list).
STATUSES = frozenset({202, 400, 401, 405, 413, 429, 500, 503})

LOG = logging.getLogger("avika.reports.core")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}  # RFC 9110: a 401 names the scheme it wants


class Response(NamedTuple):
    """An answer: status, JSON body, extra headers; `agent_id` is for the caller's log line only."""

    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] | None = None
    agent_id: str | None = None

    def encoded(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")

    def all_headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "Cache-Control": "no-store", **(self.headers or {})}


def error(status: int, code: str, reason: str, agent_id: str | None = None, **headers: str) -> Response:
    """An error answer; `reason` is safe to show the agent (it never holds secrets or tokens)."""
    return Response(status, {"error": code, "reason": reason}, dict(headers), agent_id)


class ReportsEndpoint:
    """`POST /v1/reports` over a store; `secrets` are the accepted fleet secrets (current first)."""

    def __init__(
        self, store: ReportStore, secrets: Sequence[bytes], clock: Callable[[], float] = time.time
    ) -> None:
        if not secrets:
            raise ValueError("at least one fleet secret is required")
        self.store = store
        self.secrets = list(secrets)
        self.clock = clock

    def handle(
        self, method: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """For an HTTP server: (status, headers, body bytes)."""
        response = self.respond(method, headers, body)
        return response.status, response.all_headers(), response.encoded()

    def respond(self, method: str, headers: Mapping[str, str], body: bytes) -> Response:
        """The answer to one request; never raises (an unexpected error is a logged 500)."""
        try:
            return self._respond(method, headers, body)
        except Exception:
            LOG.exception("unexpected error handling a report")
            return error(500, "internal", "internal error")

    def _respond(self, method: str, headers: Mapping[str, str], body: bytes) -> Response:
        if method.upper() != "POST":
            return error(405, "method_not_allowed", "only POST is allowed", Allow="POST")
        if len(body) > MAX_BODY_BYTES:
            return error(413, "too_large", f"body exceeds {MAX_BODY_BYTES} bytes; split the batch")
        lowered = {str(k).lower(): v for k, v in headers.items()}
        token = bearer_token(lowered.get("authorization"))
        if token is None:
            return error(
                401, "unauthorized", "missing or malformed Authorization: Bearer <token>", **_CHALLENGE
            )
        try:
            events = parse_batch(body)
        except ValidationError as exc:
            return error(400, "bad_request", exc.reason)
        agent_id = events[0]["agent_id"]
        for i, event in enumerate(events):
            if not token_matches(token, event["agent_id"], self.secrets):
                reason = f"token does not match events[{i}].agent_id"
                return error(401, "unauthorized", reason, agent_id, **_CHALLENGE)
        try:
            valid = validate_events(events)
        except ValidationError as exc:
            return error(400, "bad_request", exc.reason, agent_id)
        try:
            accepted, duplicates = self.store.put_events(valid, self.clock())
        except StoreThrottled as exc:
            LOG.warning("report store throttled: %s", exc)
            return error(
                429, "throttled", "report store is busy; retry later", agent_id, **{"Retry-After": "5"}
            )
        except StoreError as exc:
            LOG.error("report store failed: %s", exc)
            return error(503, "unavailable", "report store unavailable; retry later", agent_id)
        return Response(202, {"accepted": accepted, "duplicates": duplicates}, agent_id=agent_id)
