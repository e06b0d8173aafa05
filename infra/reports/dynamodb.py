"""The DynamoDB store (DESIGN §5): one table, items keyed exactly as the contract fixes them.

Items (the CloudFormation template and the publisher share these names, hence the constants):
- `pk=AGENT#<agent_id>, sk=STATE`: latest state; never expires; also carries the sparse index keys
  `gsi1pk=STATE#<shard>` (shard 0-15, a stable hash of the agent id) and `gsi1sk=<agent_id>`, so
  the fleet view is 16 Queries on `state-index` at any fleet size and never reads events.
- `pk=AGENT#<agent_id>, sk=EVENT#<event_id>`: each event, put with `attribute_not_exists(pk)`
  (idempotent), TTL attribute `expires_at`.
- `pk=VERSION#<target_version>, sk=AGENT#<agent_id>`: the agent's latest attempt at that version.
- `pk=AUDIT, sk=<time>#<uuid>`: an operator action (console API); never expires.

STATE and VERSION# writes are conditional on the stored position, encoding `store.supersedes`:
first as "same stream, higher seq" (the common case; the stored stream key is kept, see `pinned`),
then as "no item, or another stream with a higher (stream key, seq)". Both refused means the stored
item is newer: nothing changes (STATE only advances `last_seen`). boto3 is imported on first use,
keeping it off the Lambda's import path until a request needs it.

A heartbeat (see `store.py`) is one conditional UpdateItem of `last_seen` and `last_result` on an
existing STATE item; only an agent without one gets a STATE item made from its heartbeat (a put
with `attribute_not_exists`). The fleet scan pages `state-index` shard by shard (a position is
`<shard>:<agent_id>`); the whole-fleet read for the console's summary queries the 16 shards in
parallel, and the summary is reused for `summary_ttl` seconds (DESIGN §9: a poll every 5 s must
not read the whole fleet each time).
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .store import (
    ANYWHERE,
    DEFAULT_TTL_SECONDS,
    STICKY_FIELDS,
    BatchPlan,
    Candidate,
    ReportStore,
    StoreError,
    StoreThrottled,
    Where,
    public_record,
    state_row,
)
from .validation import EVENT_FIELDS, valid_agent_id

PK = "pk"
SK = "sk"
GSI_NAME = "state-index"
GSI_PK = "gsi1pk"
GSI_SK = "gsi1sk"
TTL_ATTRIBUTE = "expires_at"
STATE_SHARDS = 16
AUDIT_PK = "AUDIT"
SUMMARY_TTL_SECONDS = 60.0
SCAN_BUDGET = 10_000  # rows one filtered page may read (about 6 MB, 750 read units), then `next`

_THROTTLED = {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"}
_INTERNAL = {PK, SK, GSI_PK, GSI_SK, "stream_key"}


def state_shard(agent_id: str) -> int:
    """Stable shard of an agent's STATE item in `state-index` (not Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(agent_id.encode("utf-8")).digest()[:4], "big") % STATE_SHARDS


def _marshal(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, str):
        return {"S": value}
    if value is None:
        return {"NULL": True}
    raise TypeError(f"cannot store {type(value).__name__} in DynamoDB")


def _unmarshal(item: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, av in item.items():
        if name in _INTERNAL:
            continue
        (kind, value), *_ = av.items()
        out[name] = int(value) if kind == "N" else None if kind == "NULL" else value
    return out


class _Refused(Exception):
    """A conditional write whose condition did not hold."""


def _unmarshal_value(av: dict[str, Any]) -> Any:
    (kind, value), *_ = av.items()
    return int(value) if kind == "N" else None if kind == "NULL" else value


class DynamoDBStore(ReportStore):
    """Reports in one DynamoDB table; the low-level client keeps cold starts short."""

    summary_ttl = SUMMARY_TTL_SECONDS
    scan_budget = SCAN_BUDGET

    def __init__(self, table: str, *, client: Any = None, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        self.table = table
        self.ttl_seconds = ttl_seconds
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Standard retries back off on throttling; short timeouts keep a stuck call under the
            # Lambda timeout, so the agent sees a 5xx and retries instead of a gateway timeout.
            config = Config(
                retries={"mode": "standard", "max_attempts": 3}, connect_timeout=3, read_timeout=5
            )
            self._client = boto3.client("dynamodb", config=config)
        return self._client

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """Call the client, mapping AWS errors to the store's two (and refusals to `_Refused`)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(TableName=self.table, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ConditionalCheckFailedException":
                raise _Refused from None
            if code in _THROTTLED:
                raise StoreThrottled(f"dynamodb {operation}: {code}") from exc
            raise StoreError(f"dynamodb {operation}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"dynamodb {operation}: {exc}") from exc

    # --- writes ---

    def _persist(self, plan: BatchPlan) -> int:
        accepted = 0
        for record in plan.events:
            item = {name: _marshal(value) for name, value in record.items()}
            item[PK] = _marshal(f"AGENT#{record['agent_id']}")
            item[SK] = _marshal(f"EVENT#{record['event_id']}")
            item[TTL_ATTRIBUTE] = _marshal(plan.expires_at)
            try:
                self._call("put_item", Item=item, ConditionExpression="attribute_not_exists(pk)")
                accepted += 1
            except _Refused:
                pass  # a replay: already stored
        for agent_id, cand in plan.latest.items():
            key = self._state_key(agent_id)
            if not self._offer(key, cand, self._state_extra(agent_id, plan.received_at)):
                self._touch(key, plan.received_at)
        for agent_id, beat in plan.heartbeats.items():
            self._heartbeat(agent_id, beat, plan.received_at)
        for (version, agent_id), cand in plan.outcomes.items():
            self._offer({PK: _marshal(f"VERSION#{version}"), SK: _marshal(f"AGENT#{agent_id}")}, cand, {})
        return accepted

    @staticmethod
    def _state_key(agent_id: str) -> dict[str, Any]:
        return {PK: _marshal(f"AGENT#{agent_id}"), SK: _marshal("STATE")}

    @staticmethod
    def _state_extra(agent_id: str, received_at: str) -> dict[str, Any]:
        return {"last_seen": received_at, GSI_PK: f"STATE#{state_shard(agent_id)}", GSI_SK: agent_id}

    def _heartbeat(self, agent_id: str, beat: Candidate, received_at: str) -> None:
        """Liveness only: `last_seen` (and `last_result`) on the STATE item, or its first STATE."""
        sets, values = ["#seen = :now"], {":now": _marshal(received_at)}
        names = {"#seen": "last_seen"}
        if beat.record.get("last_result") is not None:
            sets.append("#result = :result")
            names["#result"] = "last_result"
            values[":result"] = _marshal(beat.record["last_result"])
        try:
            self._call(
                "update_item",
                Key=self._state_key(agent_id),
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression="attribute_exists(pk) AND (attribute_not_exists(#seen) OR #seen <= :now)",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
            return
        except _Refused:
            pass  # no STATE yet, or a newer receive time already stored
        pos = beat.position
        fields = {
            **beat.record,
            **self._state_extra(agent_id, received_at),
            "stream": pos.stream,
            "seq": pos.seq,
            "stream_key": pos.stream_key,
        }
        item = {name: _marshal(value) for name, value in fields.items()}
        item.update(self._state_key(agent_id))
        with contextlib.suppress(_Refused):
            self._call("put_item", Item=item, ConditionExpression="attribute_not_exists(pk)")

    def _offer(self, key: dict[str, Any], cand: Candidate, extra: dict[str, Any]) -> bool:
        """Write `cand` over the item at `key` if it supersedes it (see the module docstring)."""
        pos = cand.position
        fields = {**cand.record, **extra, "stream": pos.stream, "seq": pos.seq}
        names = {"#stream": "stream", "#seq": "seq", "#skey": "stream_key"}
        values = {
            ":stream": _marshal(pos.stream),
            ":seq": _marshal(pos.seq),
            ":skey": _marshal(pos.stream_key),
        }
        sets = []
        for i, (name, value) in enumerate(fields.items()):
            names[f"#f{i}"] = name
            values[f":f{i}"] = _marshal(value)
            sets.append(f"#f{i} = :f{i}")
        # Fields this event lacks must not survive from an older event (e.g. a stale `error`).
        absent = [name for name in EVENT_FIELDS if name not in fields and name not in STICKY_FIELDS]
        removes = []
        for i, name in enumerate(absent):
            names[f"#r{i}"] = name
            removes.append(f"#r{i}")
        update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        same_stream = {
            "UpdateExpression": update,
            "ConditionExpression": "#stream = :stream AND #seq < :seq",
            "ExpressionAttributeNames": {k: v for k, v in names.items() if k != "#skey"},
            "ExpressionAttributeValues": {k: v for k, v in values.items() if k != ":skey"},
        }
        other_stream = {
            "UpdateExpression": update.replace("SET ", "SET #skey = :skey, ", 1),
            "ConditionExpression": "attribute_not_exists(pk) OR (#stream <> :stream AND "
            "(#skey < :skey OR (#skey = :skey AND #seq < :seq)))",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }
        # Same stream again last: a concurrent writer may have switched the item to our stream
        # between the first two attempts, and a lower seq of it must still lose to ours.
        for attempt in (same_stream, other_stream, same_stream):
            try:
                self._call("update_item", Key=key, **attempt)
                return True
            except _Refused:
                continue
        return False

    def _touch(self, key: dict[str, Any], received_at: str) -> None:
        """An older or replayed event still proves the agent is alive: advance `last_seen` only."""
        with contextlib.suppress(_Refused):
            self._call(
                "update_item",
                Key=key,
                UpdateExpression="SET #seen = :now",
                ConditionExpression="attribute_exists(pk) AND #seen < :now",
                ExpressionAttributeNames={"#seen": "last_seen"},
                ExpressionAttributeValues={":now": _marshal(received_at)},
            )

    # --- reads ---

    def _pages(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        while True:
            page = self._call("query", **kwargs)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    @staticmethod
    def _full(item: dict[str, Any]) -> dict[str, Any]:
        raw = _unmarshal(item)
        raw["last_change"] = raw.get("received_at")
        raw.setdefault("last_result", None)
        return public_record(raw, "last_seen", "last_change")

    def _shard_items(
        self, shard: int, after: str | None = None, page_size: int | None = None
    ) -> Iterator[Any]:
        kwargs: dict[str, Any] = {
            "IndexName": GSI_NAME,
            "KeyConditionExpression": "#p = :p",
            "ExpressionAttributeNames": {"#p": GSI_PK},
            "ExpressionAttributeValues": {":p": _marshal(f"STATE#{shard}")},
        }
        if page_size is not None:
            kwargs["Limit"] = page_size
        if after is not None:
            kwargs["ExclusiveStartKey"] = {
                GSI_PK: _marshal(f"STATE#{shard}"),
                GSI_SK: _marshal(after),
                **self._state_key(after),
            }
        return self._pages(**kwargs)

    def agents(self) -> Iterator[dict[str, Any]]:
        for shard in range(STATE_SHARDS):
            for item in self._shard_items(shard):
                yield self._full(item)

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        item = self._call("get_item", Key=self._state_key(agent_id), ConsistentRead=True).get("Item")
        return self._full(item) if item else None

    @staticmethod
    def _row(item: dict[str, Any]) -> dict[str, Any]:
        raw = _unmarshal(item)
        raw["last_change"] = raw.get("received_at")
        return state_row(raw)

    def scan(
        self, after: str | None = None, where: Where = ANYWHERE, page_size: int = 1000
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Shard by shard, agent id order within a shard; `where` is left to the caller."""
        shard, start = 0, None
        if after:
            text, sep, agent_id = after.partition(":")
            if not (sep and text.isdigit() and int(text) < STATE_SHARDS and valid_agent_id(agent_id)):
                raise ValueError(f"not a scan position of this store: {after!r}")
            shard, start = int(text), agent_id
        for number in range(shard, STATE_SHARDS):
            for item in self._shard_items(number, start if number == shard else None, page_size):
                row = self._row(item)
                yield f"{number}:{row['agent_id']}", row

    def scan_all(self) -> Iterator[dict[str, Any]]:
        """The 16 shards read in parallel (the summary's whole-fleet read), rows in shard order."""
        with ThreadPoolExecutor(max_workers=STATE_SHARDS) as pool:
            shards = pool.map(
                lambda n: [self._row(item) for item in self._shard_items(n)], range(STATE_SHARDS)
            )
            for rows in shards:
                yield from rows

    def version_outcomes(self, version: str) -> list[dict[str, Any]]:
        items = self._pages(
            KeyConditionExpression="pk = :p",
            ExpressionAttributeValues={":p": _marshal(f"VERSION#{version}")},
            ConsistentRead=True,
        )
        return [public_record(_unmarshal(item)) for item in items]

    def agent_events(self, agent_id: str) -> list[dict[str, Any]]:
        items = self._pages(
            KeyConditionExpression="pk = :p AND begins_with(sk, :e)",
            ExpressionAttributeValues={":p": _marshal(f"AGENT#{agent_id}"), ":e": _marshal("EVENT#")},
            ConsistentRead=True,
        )
        return [public_record(_unmarshal(item), TTL_ATTRIBUTE) for item in items]

    # --- audit ---

    def put_audit(self, entry: dict[str, Any]) -> None:
        item = {name: _marshal(value) for name, value in entry.items() if not isinstance(value, (list, dict))}
        item[PK] = _marshal(AUDIT_PK)
        item[SK] = _marshal(f"{entry['time']}#{uuid.uuid4()}")
        self._call("put_item", Item=item, ConditionExpression="attribute_not_exists(pk)")

    def audit(self, limit: int = 50) -> list[dict[str, Any]]:
        page = self._call(
            "query",
            KeyConditionExpression="pk = :p",
            ExpressionAttributeValues={":p": _marshal(AUDIT_PK)},
            ScanIndexForward=False,
            Limit=limit,
        )
        return [
            {k: _unmarshal_value(v) for k, v in item.items() if k not in (PK, SK)}
            for item in page.get("Items", [])
        ]
