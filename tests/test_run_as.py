"""Jobs run as another user when the daemon is root (`run_as_user`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import Site, running_daemon, site_for_job_user, wait_for
from tests.test_triggered import finished, output_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

WHOAMI = {
    "run.sh": (
        'echo "uid=$(id -u) gid=$(id -g) home=$HOME user=$USER"\n'
        'touch "$WEBJOBSD_JOB_DATA_PATH/written-by-job" && echo "data writable"\n'
        'touch ./written-in-copy && echo "copy writable"\n'
    )
}


@pytest.fixture
def site() -> Iterator[Site]:
    with site_for_job_user() as reachable:
        yield reachable


async def test_continuous_and_triggered_jobs_run_as_the_configured_user(site: Site) -> None:
    site.write_job("triggered", "who", WHOAMI)
    site.write_job(
        "continuous",
        "whoami",
        {"run.sh": WHOAMI["run.sh"] + "while true; do sleep 0.2; done\n"},
    )
    async with running_daemon(site, run_as_user="nobody") as daemon:
        record = await daemon.request_run("who")
        status = await finished(site, "who", record.run_id)
        output = output_of(site, "who", record.run_id)
        assert status["Status"] == "Success", output
        assert "uid=65534 gid=65534" in output
        assert "user=nobody" in output
        assert "data writable" in output and "copy writable" in output
        await wait_for(lambda: "copy writable" in site.job_log("whoami"), what="continuous job")
        assert "uid=65534" in site.job_log("whoami")


async def test_run_as_an_unknown_user_stops_start_up(site: Site) -> None:
    with pytest.raises(Exception, match="no user named"):
        async with running_daemon(site, run_as_user="no-such-user-here"):
            pass
