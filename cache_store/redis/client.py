"""The Redis connection, to one server or a Redis Cluster: library retries with a backoff,
and one error for an outage."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
)
from redis.retry import Retry

from cache_store.partition import StoreRefusedError, StoreUnavailableError

CONNECTION_OPTIONS: dict[str, Any] = {
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "health_check_interval": 30,
}


def connect(url: str, password: str | None, retry_seconds: float, cluster: bool = False) -> Client:
    """A client that retries lost connections for about `retry_seconds`, then gives up.

    A cluster client takes the same Retry, but redis-py uses only its count there: it
    retries at once, on a slot map it asks for again.
    """
    retry = _RetryUnlessRefused(
        ExponentialBackoff(cap=0.5, base=0.05), max(1, int(retry_seconds / 0.5))
    )
    if cluster:
        return LazyCluster(
            lambda: RedisCluster.from_url(
                url,
                password=password or None,
                retry=retry,
                require_full_coverage=False,  # a partition on a node that answers goes on
                **CONNECTION_OPTIONS,
            )
        )
    return redis.Redis.from_url(
        url,
        password=password or None,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **CONNECTION_OPTIONS,
    )


class LazyCluster:
    """A RedisCluster client, made on its first call.

    RedisCluster asks a node for the slot map as it is made, and fails if none answers. A
    worker that starts while Redis is down must wait that out, like any later outage, so the
    client is made inside the first call (where redis_errors() turns the failure into
    StoreUnavailableError), and on the next one if that failed.
    """

    def __init__(self, make: Callable[[], RedisCluster]) -> None:
        self._make = make
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connected(), name)

    def connected(self) -> RedisCluster:
        with self._lock:
            if self._client is None:
                self._client = self._make()
            return self._client

    def register_script(self, script: str) -> Script:
        """The script's SHA is taken from its bytes, so registering it connects to nothing."""
        return Script(self, script.encode())

    def ping(self) -> bool:
        """Every primary answers: each holds the partitions of its slots."""
        return self.connected().ping(target_nodes=RedisCluster.PRIMARIES)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


Client = redis.Redis | LazyCluster


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
    """Turn connection loss (after redis-py's own retries) into StoreUnavailableError.

    A cluster client that reaches no node raises RedisClusterException from the connection
    error; one whose node refused it (a password, cluster mode off) from that refusal. A
    client of one server that reached a cluster node gets MOVED for most keys.
    """
    try:
        yield
    except redis.AuthenticationError as error:
        raise StoreRefusedError(f"Redis refused the credentials: {error}") from error
    except AskError as error:  # and MovedError: only a client made for one server sees them
        raise StoreRefusedError(
            f"Redis is a cluster node (slot {error.slot_id} is at {error.host}:{error.port}): "
            "connect as a cluster client (--redis-cluster)"
        ) from error
    except (
        redis.ConnectionError,
        redis.TimeoutError,
        ClusterDownError,
        SlotNotCoveredError,
    ) as error:
        raise StoreUnavailableError(f"Redis is unavailable: {error}") from error
    except RedisClusterException as error:
        if isinstance(error.__cause__, redis.AuthenticationError):
            raise StoreRefusedError(f"Redis refused the credentials: {error}") from error
        if isinstance(error.__cause__, (redis.ConnectionError, redis.TimeoutError)):
            raise StoreUnavailableError(f"Redis is unavailable: {error}") from error
        raise StoreRefusedError(f"Redis Cluster refused this client: {error}") from error
