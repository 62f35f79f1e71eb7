"""Where the states live in Redis, as one frozen settings object whose secrets never print."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_KEY_PREFIX = "streamsink"


@dataclass(frozen=True)
class RedisSettings:
    url: str = DEFAULT_REDIS_URL  # may carry a password: printed masked
    password: str | None = None  # printed as ***
    prefix: str = DEFAULT_KEY_PREFIX
    idle_ttl_seconds: int | None = None  # forget streams idle this long (None: never)
    cluster: bool = False  # url names one node of a Redis Cluster, which the client maps

    @property
    def display_url(self) -> str:
        """The URL with any password in it replaced by ***, for logs and messages."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))

    def __repr__(self) -> str:
        return (
            f"RedisSettings(url={self.display_url!r}, password={'***' if self.password else None},"
            f" prefix={self.prefix!r}, idle_ttl_seconds={self.idle_ttl_seconds!r},"
            f" cluster={self.cluster!r})"
        )
