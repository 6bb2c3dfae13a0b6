"""`python -m webjobsd` is the same as the `webjobsd` command."""

from webjobsd.cli import main

raise SystemExit(main())
