"""A few random faults of every kind under three real workers, in CI: the same checks as
`bash deploy/chaos.sh --faults 50` (tests/integration/chaos.py), with a small N."""

from __future__ import annotations

import pytest

from tests.integration.chaos import KINDS, ChaosPlan, ChaosRun

pytestmark = [pytest.mark.chaos, pytest.mark.real_model, pytest.mark.slow]


def test_random_faults_of_every_kind_lose_nothing(kafka_service, redis_service, tmp_path) -> None:
    plan = ChaosPlan(faults=len(KINDS), seed=12)
    report = ChaosRun(plan, kafka_service, redis_service, tmp_path).run()
    print(report.summary(plan))
    assert report.problems == []
    assert report.faults == {kind: 1 for kind in KINDS}
    assert report.commentaries == plan.streams * plan.lines // 4
    assert report.dead_letters == plan.bad_records
