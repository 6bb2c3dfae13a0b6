"""PID 1 of a test host (see tests/multihost.py): private /tmp, own host name, one daemon.

    hostinit.py HOSTNAME SHARED_DIR [SHARED_DIR ...] -- COMMAND [ARG ...]

Runs inside the namespaces `unshare --pid --fork --mount --uts --mount-proc` made. It mounts a
fresh tmpfs on /tmp (the host's own: working copies, shutdown files, whatever jobs write there),
then binds each SHARED_DIR back at its own path inside it (they live under pytest's /tmp too):
the folders are opened before the tmpfs hides them, and bound from those descriptors. It sets
the host name (the daemon's instance id defaults to it), starts COMMAND, passes SIGTERM and
SIGINT on to it, and reaps every process of the namespace (orphans are re-parented to it).

When COMMAND ends, this process ends with its exit code, and the kernel kills whatever else is
left in the namespace: a host never outlives its daemon. SIGKILL to this process from outside is
a power cut: every process of the host dies at once, and nothing of the daemon's shutdown runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

MS_BIND = 4096
MS_REC = 16384


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    encoded = [value.encode() if value is not None else None for value in (source, target, fstype)]
    options = data.encode() if data is not None else None
    if libc.mount(*encoded, ctypes.c_ulong(flags), options) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {source} on {target}: {os.strerror(error)}")


def main(argv: list[str]) -> int:
    separator = argv.index("--")
    hostname, *shared = argv[:separator]
    command = argv[separator + 1 :]
    kept = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in shared]
    _mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777")
    for path, descriptor in kept:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{descriptor}", path, None, MS_BIND | MS_REC, None)
        os.close(descriptor)
    socket.sethostname(hostname)

    child = os.fork()
    if child == 0:
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        pid, status = os.wait()
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code  # a signal, as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
