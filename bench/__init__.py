"""The benchmark harness: `bash scripts/bench` (or `python -m bench`), `--quick` for a smoke run.

    system.py     processes, CPU pinning, /proc readers, ports, tiny HTTP helpers
    upstreams.py  the servers: nginx (upstream, TLS upstream, proxy anchor), fake Sobot, sobot-proxy
    load.py       wrk, and its summary read back as numbers
    relay.py      a TCP relay adding a network round trip (run as `python -m bench.relay`)
    scenarios.py  what is measured: throughput, memory, the real client, workers
    report.py     the targets, the printed table
    __main__.py   the command: runs the scenarios, writes the JSON, prints the table

Nothing here imports from tests/; the proxy is only ever run as the real command.
"""
