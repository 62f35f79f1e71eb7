"""The Redis connection: library retries with a backoff, and one error for an outage."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from cache_store.partition import StoreRefusedError, StoreUnavailableError


def connect(url: str, password: str | None, retry_seconds: float) -> redis.Redis:
    """A client that retries lost connections for about `retry_seconds`, then gives up."""
    retries = max(1, int(retry_seconds / 0.5))
    return redis.Redis.from_url(
        url,
        password=password or None,
        retry=_RetryUnlessRefused(ExponentialBackoff(cap=0.5, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


class _RetryUnlessRefused(Retry):
    """Retries lost connections, not a refused password: waiting would not fix that."""

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable is None or is_retryable(error)

        return super().call_with_retry(do, fail, retryable, with_failure_count)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn connection loss (after redis-py's own retries) into StoreUnavailableError."""
    try:
        yield
    except redis.AuthenticationError as error:
        raise StoreRefusedError(f"Redis refused the credentials: {error}") from error
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise StoreUnavailableError(f"Redis is unavailable: {error}") from error
