"""`python -m proxy` is the same as the `sobot-proxy` command."""

from proxy.cli.main import main

raise SystemExit(main())
