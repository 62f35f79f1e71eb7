"""The distributed worker with its states in a three-node Redis Cluster: the commentary is the
one a worker on a single Redis server writes, across a handoff that restores every stream."""

from __future__ import annotations

import pytest

from tests.integration.cluster import Cluster, check_against
from tests.integration.worker_harness import EXPECTED, STREAMS

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_a_handoff_through_the_cluster_writes_the_single_server_commentary(
    kafka_service, redis_cluster_service, reference, tmp_path
) -> None:
    c = Cluster("on-cluster", kafka_service, redis_cluster_service, tmp_path)
    try:
        c.produce(slice(0, 8))
        first = c.worker("first")
        c.wait_for({(stream, 1) for stream in STREAMS})
        assert first.terminate() == 0  # SIGTERM: every state committed to the cluster
        c.produce(slice(8, None))
        second = c.worker("second")
        records = c.wait_for(EXPECTED)
        assert second.terminate() == 0
    finally:
        c.close()
    check_against(reference, records)
    took_over = second.summary()
    assert took_over["restored_streams"] == len(STREAMS) and took_over["prefill_tokens"] == 0
    store = redis_cluster_service.store(prefix=c.name)
    assert store.list_streams() == sorted(STREAMS)
    assert {store.info(stream).scope for stream in STREAMS} <= {
        f"{c.topics.input}/{p}" for p in range(4)
    }
    store.close()
