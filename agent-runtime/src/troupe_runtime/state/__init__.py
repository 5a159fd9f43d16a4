"""Revision-checked shared state for handlers: KV buckets, event logs, watches.

``StateStore`` is the entry point; everything a handler may catch or receive
is re-exported here.
"""

from troupe_runtime.state.errors import (
    BucketNotProvisionedError,
    ConflictError,
    InvalidValueError,
    KeyExistsError,
    LockTimeoutError,
    ReadOnlyBucketError,
    StateError,
    UnknownBucketError,
)
from troupe_runtime.state.events import Event, EventLog, Follow
from troupe_runtime.state.kv import Change, Watch
from troupe_runtime.state.merge import MergeFunction
from troupe_runtime.state.policies import Entry, Tuning, UpdateFunction
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
