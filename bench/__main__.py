"""`python3 -m bench`: the comparison harness (normally started by `bench/run`)."""

from bench.cli import main

raise SystemExit(main())
