"""`python -m sluice.proxy ...` is the same as the `sluice` console script."""

from sluice.proxy.cli import main

raise SystemExit(main())
