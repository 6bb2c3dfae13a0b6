"""A fast stdout writer of fixed-length numbered lines, for the log capture scenario.

    python3 bench/writer.py --blocks N [--stamps FILE --name NAME] [--linger]

Writes N blocks of 1000 lines of 100 bytes (`L{block:06d}.{line:03d} xxx...x\\n`), so N blocks
are N * 100,000 bytes. The first instruction appends a stamp (`TIME NAME PID`) to FILE. With
`--linger` it closes stdout and sleeps until killed, so that a supervisor does not restart it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

LINES_PER_BLOCK = 1000
LINE_BYTES = 100
BLOCK_BYTES = LINES_PER_BLOCK * LINE_BYTES
PAD = b"x" * (LINE_BYTES - 13)  # 'L' + 6 digits + '.' + 3 digits + ' ' + PAD + '\n'
PLACEHOLDER = b"@@@@@@"


def last_line(blocks: int) -> bytes:
    return b"L%06d.%03d %s\n" % (blocks - 1, LINES_PER_BLOCK - 1, PAD)


def block_template() -> bytes:
    return b"".join(b"L%s.%03d %s\n" % (PLACEHOLDER, line, PAD) for line in range(LINES_PER_BLOCK))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, required=True)
    parser.add_argument("--stamps")
    parser.add_argument("--name", default="writer")
    parser.add_argument("--linger", action="store_true")
    args = parser.parse_args()
    template = block_template()
    if args.stamps:
        with open(args.stamps, "a") as handle:
            handle.write(f"{time.time():.6f} {args.name} {os.getpid()}\n")
    for block in range(args.blocks):
        write_all(1, template.replace(PLACEHOLDER, b"%06d" % block))
    if args.linger:
        sys.stdout.flush()
        os.close(1)
        while True:
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
