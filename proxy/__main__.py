"""`python -m proxy` is the same as the `sobot-proxy` command."""

import os

from proxy.server.hangups import note_early

# A worker of several (cli/workers.py: WORKER_ENV) is born ignoring SIGHUP: from here on, before
# the imports that take most of its start, a reload the supervisor passes on is noted, not lost.
if "SOBOT_PROXY_WORKER" in os.environ:
    note_early()

from proxy.cli.main import main

raise SystemExit(main())
