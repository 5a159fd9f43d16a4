"""Revision-checked shared state for handlers: KV buckets, event logs, watches.

``StateStore`` is the entry point; everything a handler may catch or receive
is re-exported here.
"""

from troupe_runtime.contract.state_entries import Entry
from troupe_runtime.contract.state_errors import (
    BucketNotProvisionedError,
    ConflictError,
    InvalidValueError,
    KeyExistsError,
    LockTimeoutError,
    ReadOnlyBucketError,
    StateError,
    UnknownBucketError,
)
from troupe_runtime.nats.event_log import Event, EventLog, Follow
from troupe_runtime.nats.kv import Change, Watch
from troupe_runtime.state.merge import MergeFunction
from troupe_runtime.state.policies import Tuning, UpdateFunction
from troupe_runtime.state.store import Bucket, StateStore

__all__ = [
    "Bucket",
    "BucketNotProvisionedError",
    "Change",
    "ConflictError",
    "Entry",
    "Event",
    "EventLog",
    "Follow",
    "InvalidValueError",
    "KeyExistsError",
    "LockTimeoutError",
    "MergeFunction",
    "ReadOnlyBucketError",
    "StateError",
    "StateStore",
    "Tuning",
    "UnknownBucketError",
    "UpdateFunction",
    "Watch",
]
