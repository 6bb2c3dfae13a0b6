"""The scenario of test_multihost.py with `watch: poll`, as hosts on NFS need it: no host hears
of another's writes, the scan is the only source of events."""

from __future__ import annotations

import pytest

from tests.test_multihost import (
    observed_in,
    test_a_continuous_job_runs_once_on_every_host,
    test_a_deployment_through_one_host_restarts_each_host_once,
    test_a_run_elsewhere_is_409_and_every_host_answers_the_same_history,
    test_a_singleton_runs_on_exactly_one_host_and_moves_within_5_s,
    test_detailed_status_lists_live_hosts_and_drops_a_dead_one,
    test_every_scheduled_occurrence_runs_exactly_once_across_hosts,
)

pytestmark = pytest.mark.timeout(300)

observed = observed_in("poll")

__all__ = [
    "test_a_continuous_job_runs_once_on_every_host",
    "test_a_deployment_through_one_host_restarts_each_host_once",
    "test_a_run_elsewhere_is_409_and_every_host_answers_the_same_history",
    "test_a_singleton_runs_on_exactly_one_host_and_moves_within_5_s",
    "test_detailed_status_lists_live_hosts_and_drops_a_dead_one",
    "test_every_scheduled_occurrence_runs_exactly_once_across_hosts",
]
