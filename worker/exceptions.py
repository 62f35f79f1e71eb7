"""One exception hierarchy for the worker; every message says how to fix the problem."""


class StreamsinkError(Exception):
    """Base of every error the worker raises on purpose."""


class UnsupportedModelError(StreamsinkError):
    """The architecture has no position scheme, so the sink cache cannot run it correctly."""


class ModelLoadError(StreamsinkError):
    """A model could not be found, fetched or loaded."""


class CacheCapacityError(StreamsinkError):
    """A chunk larger than the window, or a pinned prefix too long for the cache."""


class CacheDamagedError(StreamsinkError):
    """A forward failed half-way through a cache whose evicted slots it had begun to reuse."""


class BadRecordError(StreamsinkError):
    """An input record that cannot be processed; the run counts it, logs it and goes on.

    `reason` is a short stable label used in metrics and dead-letter records.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
