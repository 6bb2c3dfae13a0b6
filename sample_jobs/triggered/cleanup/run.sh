#!/usr/bin/env bash
# A triggered job: runs when asked; arguments arrive as "$@".
echo "cleanup run $WEBJOBS_RUN_ID with $# argument(s)"
for arg in "$@"; do echo "  argument: $arg"; done
find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'webjobsd-demo-*' -mmin +60 -print -delete
echo "done"
