"""`python -m router_worker ...` is the `router-worker` command."""

from router_worker.cli import main

main()
