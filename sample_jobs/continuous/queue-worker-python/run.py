"""A continuous Python job: polls a folder as a tiny work queue, one file = one task."""

import os
import pathlib
import signal
import sys
import time

stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
queue = pathlib.Path(os.environ.get("WEBJOBS_DATA_PATH", ".")) / "queue"
queue.mkdir(parents=True, exist_ok=True)
print(f"worker watching {queue}", flush=True)
while not stop:
    for task in sorted(queue.glob("*.txt")):
        print(f"processing {task.name}: {task.read_text().strip()!r}", flush=True)
        task.unlink()
    time.sleep(1)
print("worker stopped", file=sys.stderr, flush=True)
