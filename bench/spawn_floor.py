"""The floor under "start N jobs": a bare Python loop that spawns N of the bench's jobs.

    python3 bench/spawn_floor.py [N]        (default 1000)

Each job is what scenario 7 and `scale` start (a bash script that stamps a file, then becomes
`sleep`), spawned the way a supervisor must: stdout and stderr on pipes, a session of its own,
no inherited descriptors. Prints how long the spawns took and when the last job's first
instruction (its stamp) was seen. No manager does less per job, so no manager can start N jobs
faster on the same machine: a target for "start N jobs" below this figure cannot be met there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = '#!/bin/bash\n: > "$1"\nexec sleep infinity\n'


def main(count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="wjbench-floor-") as folder:
        root = Path(folder)
        script = root / "job.sh"
        script.write_text(SCRIPT)
        script.chmod(0o755)
        stamps = root / "stamps"
        stamps.mkdir()
        started = time.monotonic()
        processes = [
            subprocess.Popen(
                ["/bin/bash", str(script), str(stamps / str(index))],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            for index in range(count)
        ]
        spawned = time.monotonic() - started
        while len(os.listdir(stamps)) < count:
            time.sleep(0.005)
        ran = time.monotonic() - started
        for process in processes:
            process.kill()
        for process in processes:
            process.communicate()
    print(f"{count} jobs: spawned in {spawned:.2f} s, every first instruction by {ran:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
