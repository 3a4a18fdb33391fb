"""`python -m orchestrator.deploy render|check` (orchestrator.deploy.cli)."""

from orchestrator.deploy.cli import main

raise SystemExit(main())
