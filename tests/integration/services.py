"""The real Kafka broker, Redis server and Redis Cluster, started through the same scripts a
person uses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from cache_store.redis.store import RedisStore

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


class Service:
    """One deploy/<script>.sh service kept in `directory`; restarts keep its address and data."""

    def __init__(self, script: str, directory: Path) -> None:
        self.script = DEPLOY / script
        self.directory = directory
        self.address = ""

    def start(self) -> str:
        result = subprocess.run(
            ["bash", str(self.script), "start", str(self.directory)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{self.script.name} start failed:\n{result.stderr[-3000:]}")
        self.address = result.stdout.strip().splitlines()[-1]
        return self.address

    def stop(self) -> None:
        subprocess.run(["bash", str(self.script), "stop", str(self.directory)], check=True)

    def restart(self) -> None:
        self.stop()
        if self.start() == "":
            raise RuntimeError(f"{self.script.name} restarted without an address")


class KafkaService(Service):
    def __init__(self, directory: Path) -> None:
        super().__init__("kafka.sh", directory)

    @property
    def bootstrap(self) -> str:
        return self.address


class RedisService(Service):
    cluster = False

    def __init__(self, directory: Path, script: str = "redis.sh") -> None:
        super().__init__(script, directory)

    @property
    def url(self) -> str:
        return self.address

    def client(self) -> redis.Redis | RedisCluster:
        return redis.Redis.from_url(self.url)

    def store(self, **options) -> RedisStore:
        return RedisStore(self.url, cluster=self.cluster, **options)


class RedisClusterService(RedisService):
    """Three primaries; `url` names one of them, and clients find the others from it."""

    cluster = True

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, "redis-cluster.sh")

    def client(self) -> RedisCluster:
        return RedisCluster.from_url(self.url)
