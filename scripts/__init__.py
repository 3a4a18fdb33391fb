"""Tools run from a checkout, never installed (pyproject's package list names only orchestrator and workloads).
A package so that the scripts and the tests can share `scripts.local_ray`."""
