"""`python -m workloads.data` (workloads.data.cli)."""

from workloads.data.cli import main

raise SystemExit(main())
