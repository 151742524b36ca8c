"""`python -m proxy ...` is the same as the `sluice` console script."""

from proxy.cli import main

raise SystemExit(main())
