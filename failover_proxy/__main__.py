"""`python -m failover_proxy` is the same as the `failover-proxy` command."""

from .cli import main

raise SystemExit(main())
