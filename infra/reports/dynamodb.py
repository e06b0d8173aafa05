"""The DynamoDB store (DESIGN §5): one table, items keyed exactly as the contract fixes them.

Items (the CloudFormation template and the publisher share these names, hence the constants):
- `pk=AGENT#<agent_id>, sk=STATE`: latest state; never expires; also carries the sparse index keys
  `gsi1pk=STATE#<shard>` (shard 0-15, a stable hash of the agent id) and `gsi1sk=<agent_id>`, so
  the fleet view is 16 Queries on `state-index` at any fleet size and never reads events.
- `pk=AGENT#<agent_id>, sk=EVENT#<event_id>`: each event, put with `attribute_not_exists(pk)`
  (idempotent), TTL attribute `expires_at`.
- `pk=VERSION#<target_version>, sk=AGENT#<agent_id>`: the agent's latest attempt at that version.

STATE and VERSION# writes are conditional on the stored position, encoding `store.supersedes`:
first as "same stream, higher seq" (the common case; the stored stream key is kept, see `pinned`),
then as "no item, or another stream with a higher (stream key, seq)". Both refused means the stored
item is newer: nothing changes (STATE only advances `last_seen`). boto3 is imported on first use,
keeping it off the Lambda's import path until a request needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

from .store import (
    DEFAULT_TTL_SECONDS,
    BatchPlan,
    Candidate,
    ReportStore,
    StoreError,
    StoreThrottled,
    public_record,
)
from .validation import EVENT_FIELDS

PK = "pk"
SK = "sk"
GSI_NAME = "state-index"
GSI_PK = "gsi1pk"
GSI_SK = "gsi1sk"
TTL_ATTRIBUTE = "expires_at"
STATE_SHARDS = 16

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


class DynamoDBStore(ReportStore):
    """Reports in one DynamoDB table; the low-level client keeps cold starts short."""

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
            key = {PK: _marshal(f"AGENT#{agent_id}"), SK: _marshal("STATE")}
            extra = {
                "last_seen": plan.received_at,
                GSI_PK: f"STATE#{state_shard(agent_id)}",
                GSI_SK: agent_id,
            }
            if not self._offer(key, cand, extra):
                self._touch(key, plan.received_at)
        for (version, agent_id), cand in plan.outcomes.items():
            self._offer({PK: _marshal(f"VERSION#{version}"), SK: _marshal(f"AGENT#{agent_id}")}, cand, {})
        return accepted

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
        absent = [name for name in EVENT_FIELDS if name not in fields]
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

    def agents(self) -> Iterator[dict[str, Any]]:
        for shard in range(STATE_SHARDS):
            for item in self._pages(
                IndexName=GSI_NAME,
                KeyConditionExpression="#p = :p",
                ExpressionAttributeNames={"#p": GSI_PK},
                ExpressionAttributeValues={":p": _marshal(f"STATE#{shard}")},
            ):
                yield public_record(_unmarshal(item), "last_seen")

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        item = self._call(
            "get_item", Key={PK: _marshal(f"AGENT#{agent_id}"), SK: _marshal("STATE")}, ConsistentRead=True
        ).get("Item")
        return public_record(_unmarshal(item), "last_seen") if item else None

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
