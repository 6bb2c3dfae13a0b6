#!/usr/bin/env bash
# A continuous job: prints a heartbeat, and leaves cleanly when asked to stop
# (the daemon creates $WEBJOBS_SHUTDOWN_FILE and sends SIGTERM).
trap 'echo "stopping on SIGTERM"; exit 0' TERM
echo "heartbeat job started as $WEBJOBS_NAME in $WEBJOBS_PATH"
n=0
while [ ! -f "${WEBJOBS_SHUTDOWN_FILE:-/nonexistent}" ]; do
    n=$((n + 1))
    echo "beat $n"
    sleep 10 & wait $!
done
echo "shutdown file seen, bye"
