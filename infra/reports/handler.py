"""AWS Lambda entry point (`infra.reports.handler.handler`, HTTP API payload format 2.0; DESIGN §5).

A thin shell around `core.ReportsEndpoint`: it decodes the API Gateway event, loads configuration
once per container, and writes one JSON log line per request to stdout. Only the standard library
and our own modules are imported here; boto3 is imported when the first request needs AWS, which
keeps the cold start's import work small (see `bench/handler_importtime.py`).

Configuration (environment):
- store: `AVIKA_REPORTS_TABLE` (DynamoDB table), else `AVIKA_REPORTS` (`sqlite:///...` or
  `dynamodb://...`, for running the same handler locally);
- fleet secret, first set wins: `AVIKA_FLEET_SECRET_ID` (Secrets Manager),
  `AVIKA_FLEET_SECRET_PARAMETER` (SSM SecureString, decrypted), `AVIKA_FLEET_SECRET` (plain);
  each holds `current` or `current,previous`;
- `AVIKA_REPORTS_TTL_DAYS`: event retention (default 30).
The secret is read once and cached for the container's life (rotation relies on the previous secret
staying accepted until containers recycle). A configuration error is a logged 500 and is retried on
the next request, so fixing the environment needs no redeploy of code.

The operator API's routes (DESIGN section 9: `/v1/fleet`, `/v1/agents/...`, `/v1/releases`,
`/v1/rollout`, `/v1/halt`) go to `console_lambda.py`, imported on the first such request only: the
reports route's cold start never pays for the publisher and cryptography the console needs.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys
import time
from typing import Any

from .auth import ConfigError, parse_secrets
from .console_routes import is_console_path
from .core import ReportsEndpoint, Response, error
from .store import DEFAULT_TTL_SECONDS, ReportStore


class _JsonLines(logging.Formatter):
    """One JSON object per line, so CloudWatch Logs Insights can query fields directly."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _Stdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time (the runtime or a test may swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


LOG = logging.getLogger("avika.reports")
if not LOG.handlers:
    _stdout = _Stdout()
    _stdout.setFormatter(_JsonLines())
    LOG.addHandler(_stdout)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # the Lambda runtime's root handler would wrap our JSON in its own format

_endpoint: ReportsEndpoint | None = None
_cold = True


def _read_secret() -> str:
    """The raw fleet secret value from the first configured source."""
    if secret_id := os.environ.get("AVIKA_FLEET_SECRET_ID"):
        try:
            import boto3

            value = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id).get("SecretString")
        except Exception as exc:  # AccessDenied, not found, network: all mean "not configured"
            raise ConfigError(f"cannot read Secrets Manager secret {secret_id!r}: {exc}") from exc
        if not isinstance(value, str):
            raise ConfigError(f"Secrets Manager secret {secret_id!r} has no SecretString")
        return value
    if parameter := os.environ.get("AVIKA_FLEET_SECRET_PARAMETER"):
        try:
            import boto3

            answer = boto3.client("ssm").get_parameter(Name=parameter, WithDecryption=True)
        except Exception as exc:
            raise ConfigError(f"cannot read SSM parameter {parameter!r}: {exc}") from exc
        return answer["Parameter"]["Value"]
    if value := os.environ.get("AVIKA_FLEET_SECRET"):
        return value
    raise ConfigError(
        "no fleet secret: set AVIKA_FLEET_SECRET_ID, AVIKA_FLEET_SECRET_PARAMETER or AVIKA_FLEET_SECRET"
    )


def _open_store() -> ReportStore:
    ttl_days = os.environ.get("AVIKA_REPORTS_TTL_DAYS", "")
    if ttl_days and not (ttl_days.isdigit() and int(ttl_days) > 0):
        raise ConfigError(f"AVIKA_REPORTS_TTL_DAYS must be a positive whole number, not {ttl_days!r}")
    ttl = int(ttl_days) * 86400 if ttl_days else DEFAULT_TTL_SECONDS
    if table := os.environ.get("AVIKA_REPORTS_TABLE"):
        from .dynamodb import DynamoDBStore

        return DynamoDBStore(table, ttl_seconds=ttl)
    if url := os.environ.get("AVIKA_REPORTS"):
        try:
            return ReportStore.from_url(url, ttl_seconds=ttl)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    raise ConfigError("no report store: set AVIKA_REPORTS_TABLE")


def endpoint() -> ReportsEndpoint:
    """The container's endpoint, configured on first use and then cached."""
    global _endpoint
    if _endpoint is None:
        _endpoint = ReportsEndpoint(_open_store(), parse_secrets(_read_secret()))
    return _endpoint


def reset() -> None:
    """Forget the cached configuration (tests; a fresh container does the same)."""
    global _endpoint, _cold
    if _endpoint is not None:
        _endpoint.store.close()
    _endpoint, _cold = None, True
    if "infra.reports.console_lambda" in sys.modules:
        sys.modules["infra.reports.console_lambda"].reset()


def _request(event: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    """(method, lower-cased headers, body bytes) of a payload-2.0 event; ValueError if undecodable."""
    method = str(((event.get("requestContext") or {}).get("http") or {}).get("method") or "")
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    raw = event.get("body") or ""
    if event.get("isBase64Encoded"):
        return method, headers, base64.b64decode(raw, validate=True)
    return method, headers, raw.encode("utf-8")  # UnicodeEncodeError (lone surrogates) is a ValueError


def _answer(event: dict[str, Any]) -> tuple[str, Response]:
    try:
        method, headers, body = _request(event)
    except (ValueError, binascii.Error, AttributeError, TypeError):
        return "", error(400, "bad_request", "request body could not be decoded")
    try:
        ep = endpoint()
    except ConfigError as exc:
        LOG.error("configuration error", extra={"fields": {"error": str(exc)}})
        return method, error(500, "misconfigured", "the report endpoint is misconfigured")
    except Exception:  # e.g. an unopenable SQLite file: still an answer, not a traceback
        LOG.exception("cannot configure the report endpoint")
        return method, error(500, "misconfigured", "the report endpoint is misconfigured")
    return method, ep.respond(method, headers, body)


def _path(event: dict[str, Any]) -> str:
    path = event.get("rawPath")
    if not isinstance(path, str):
        path = ((event.get("requestContext") or {}).get("http") or {}).get("path")
    return path if isinstance(path, str) else ""


def _console(event: dict[str, Any], path: str) -> tuple[str, Any, dict[str, Any]]:
    """(method, answer, log fields) of an operator API request."""
    try:
        method, headers, body = _request(event)
    except (ValueError, binascii.Error, AttributeError, TypeError):
        from .console_api import problem

        return "", problem(400, "bad_request", "request body could not be decoded"), {}
    from .console_lambda import answer

    response, who = answer(event, method, path, headers, body)
    fields = {"path": path, "who": who}
    if isinstance(response.body, dict) and "error" in response.body:
        fields["error"] = response.body["error"]
    return method, response, fields


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point: API Gateway HTTP API (payload 2.0) event in, HTTP response dict out."""
    global _cold
    started = time.perf_counter()
    path = _path(event)
    if is_console_path(path):
        method, response, extra = _console(event, path)
    else:
        method, response = _answer(event)
        extra = {"agent_id": response.agent_id, **response.body}
    fields: dict[str, Any] = {
        "request_id": getattr(context, "aws_request_id", None),
        "method": method,
        "status": response.status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "cold_start": _cold,
        **extra,
    }
    _cold = False
    level = (
        logging.INFO if response.status < 400 else logging.WARNING if response.status < 500 else logging.ERROR
    )
    LOG.log(level, "console request" if "path" in extra else "report request", extra={"fields": fields})
    return {
        "statusCode": response.status,
        "headers": response.all_headers(),
        "body": response.encoded().decode("utf-8"),
        "isBase64Encoded": False,
    }
