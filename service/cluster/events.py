"""Change events: what a replica announces on the events channel after it writes to the shared store.

One JSON message per write, published on `<key prefix>events` right after the write is durable:

    {"kind": "uploaded", "task": "sst2", "version": 4, "generation": 118, "origin": "host-a-4711"}

`kind` says what happened (a new version, an active-pointer move, a deletion); `generation` is the
registry-wide write counter the write produced, which lets a subscriber tell whether it missed a message
(see `service.cluster.sync`). Pub/sub is fire-and-forget: an event is a hint to refresh now, never the
only way a replica learns about a change.
"""

from __future__ import annotations

from enum import Enum

import redis
from pydantic import BaseModel, ConfigDict, Field


class EventKind(str, Enum):
    UPLOADED = "uploaded"  # a new version was stored (and maybe activated)
    ACTIVATED = "activated"  # the active pointer moved (rollback / roll-forward)
    DELETED = "deleted"  # every version and the pointer were removed


class ChangeEvent(BaseModel):
    """One write to the shared store, as announced to every replica."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: EventKind
    task: str
    version: int | None = Field(None, description="the version written or activated; None for a deletion")
    generation: int = Field(ge=1, description="the store's generation counter right after this write")
    origin: str = Field(description="replica id of the writer")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes | str) -> ChangeEvent:
        """Parse a message; raises pydantic.ValidationError for anything that is not a change event."""
        return cls.model_validate_json(data)


def events_channel(key_prefix: str) -> str:
    """The pub/sub channel of a deployment (same prefix as its keys)."""
    return f"{key_prefix}events"


def publish_event(client: redis.Redis, channel: str, event: ChangeEvent) -> int:
    """Publish `event`; returns how many subscribers received it (Redis errors propagate)."""
    return int(client.publish(channel, event.encode()))
