"""Errors raised when a stored stream state cannot be used; every message says how to fix it."""


class StateError(Exception):
    """Base of every error a state store or the codec raises on purpose."""


class StateCorruptError(StateError):
    """The stored state is damaged: unreadable manifest, missing or altered block."""


class StateVersionError(StateError):
    """The state was written in a format version this code does not know (a newer streamsink)."""


class StateForeignError(StateError):
    """The state was written by another model; resuming from it would be silently wrong."""


class MissingBlocksError(StateError):
    """A save named blocks the store no longer holds (the stream's state expired or was
    deleted meanwhile); nothing was written: save the streams whole (`stored` empty)."""
