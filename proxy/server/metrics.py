"""Prometheus metrics, served at GET /metrics in the text format.

Label values are bounded, so a client cannot grow the series without limit: paths are never a
label (requests are grouped by the prefix of the route they went along, or by the longest
SOBOT_METRICS_ROUTES prefix they start with, which refines it; `other` for a path no route
serves), credential sets are the configured ones, methods outside the standard ones count as
`other`, and return codes beyond the first MAX_RET_CODES distinct ones seen count as `other`.

Tenants: `sobot_proxy_requests_total` carries a `tenant` label (a configured name, or `none` for
a request refused before its tenant was known), and the token calls and token gauges are per
tenant and set, created when a tenant is first used (and dropped when a reload removes it). The
latency histograms and the replays have no tenant label: with a thousand tenants, 15 buckets x
routes x tenants would be the bulk of every scrape, while the request counter grows by a few
series per tenant actually used.

With `--workers N` every worker counts into files in a directory the supervisor shares
(prometheus-client's multiprocess mode, chosen by PROMETHEUS_MULTIPROC_DIR at start-up), so a
scrape that reaches any worker reports the sum over all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.server.request_log import RequestRecord

MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
NAMESPACE: Final = "sobot_proxy"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_RET_CODES: Final = 100
_RET_CODE: Final = re.compile(r"[0-9A-Za-z_-]{1,16}")
# Sobot answers in tens to hundreds of milliseconds; the proxy's own share is microseconds.
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
GET_TOKEN_RESULTS: Final = ("ok", "refused", "unreachable", "malformed")
# Why the proxy closed a client connection itself (server/connections.py).
CLIENT_TIMEOUTS: Final = ("header_nothing", "header_partial", "send")


class Metrics:
    """Every metric of one proxy process, and its /metrics page."""

    def __init__(self, *, routes: tuple[str, ...] = ()) -> None:
        """`routes`: SOBOT_METRICS_ROUTES."""
        # No `_created` series beside every counter: they double the page and nobody graphs
        # them. (A switch of the library's, for the process.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._multiprocess_dir = os.environ.get(MULTIPROCESS_ENV)
        self._registry = CollectorRegistry(auto_describe=True)
        registry = self._registry
        self.requests = Counter(
            "requests",
            "Requests answered, by route group, method, HTTP status and Sobot ret_code "
            "(`none` when the answer carried none; `cancelled` status: the client left first) "
            "and tenant",
            ["route", "method", "status", "ret_code", "tenant"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.duration = Histogram(
            "request_duration_seconds",
            "Time from a request's arrival to its answer's end, in seconds",
            ["route"],
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "upstream_duration_seconds",
            "Time spent on Sobot's side of forwarded requests (both attempts), in seconds",
            ["route"],
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.replays = Counter(
            "replays",
            "Requests replayed once after Sobot rejected the token (v5: 900002 / 900001; V6: 401)",
            ["route"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.get_token = Counter(
            "get_token_calls",
            "Calls to a token endpoint (v5 get_token, V6 /tokens/company), by tenant, credential "
            "set and result: ok, refused (the endpoint said no), unreachable, malformed",
            ["tenant", "credentials", "result"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.in_flight = Gauge(
            "in_flight_requests",
            "Requests being handled now",
            namespace=NAMESPACE,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.spool_reserved = Gauge(
            "spool_reserved_bytes",
            "Disk room reserved now for request bodies kept for the replay (SOBOT_SPOOL_LIMIT "
            "bounds it)",
            namespace=NAMESPACE,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.spool_limit = Gauge(
            "spool_limit_bytes",
            "The most disk room request bodies may take at once (SOBOT_SPOOL_LIMIT)",
            namespace=NAMESPACE,
            multiprocess_mode="livesum",  # each worker has its share
            registry=registry,
        )
        self.store_errors = Counter(
            "token_store_errors",
            "Times the shared token store (Redis, or the workers' file) could not be used",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.client_connections = Gauge(
            "client_connections",
            "Client connections open now",
            namespace=NAMESPACE,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.client_timeouts = Counter(
            "client_timeouts",
            "Client connections closed by the proxy, by kind: header_nothing (no request "
            "within the header timeout), header_partial (a request head begun and not "
            "finished in time), send (the client took none of its answer for the read timeout)",
            ["kind"],
            namespace=NAMESPACE,
            registry=registry,
        )
        for kind in CLIENT_TIMEOUTS:
            self.client_timeouts.labels(kind)
        self.store_errors.inc(0)
        self._routes = tuple(sorted(routes, key=len, reverse=True))  # the longest prefix wins
        self._ret_codes: set[str] = set()
        # Bounded as the labels are: routes x methods x statuses x return codes x tenants seen.
        self._counters: dict[tuple[str, str, str, str, str], Counter] = {}
        self._per_route: dict[str, _RouteMetrics] = {}
        self._token = _TokenCollector()
        registry.register(self._token)
        if self._multiprocess_dir is None:
            ProcessCollector(registry=registry)  # memory, CPU, open files (not per worker)

    def token_calls(self, tenant: str, credentials: str) -> dict[str, Counter]:
        """The token call counters of a tenant's set, by result: every result shows, at 0,
        from when the tenant is first used."""
        return {
            result: self.get_token.labels(tenant, credentials, result)
            for result in GET_TOKEN_RESULTS
        }

    def watch_token(
        self, tenant: str, credentials: str, expires_in: Callable[[], float | None]
    ) -> None:
        """Report `expires_in()` (seconds, None: no token held) of the credential set
        `credentials` of `tenant` at every scrape."""
        self._token.expires_in[tenant, credentials] = expires_in

    def unwatch_token(
        self, tenant: str, credentials: str, expires_in: Callable[[], float | None]
    ) -> None:
        """Stop reporting `expires_in` (a retired manager's), unless another replaced it."""
        if self._token.expires_in.get((tenant, credentials)) == expires_in:
            del self._token.expires_in[tenant, credentials]

    def forget(self, tenant: str, credentials: tuple[str, ...], *, requests: bool) -> None:
        """Drop the token call counts of sets a reload removed and, with `requests`, the
        request counts of a tenant it removed: the labels stay those of configured names.
        (Not with --workers: prometheus-client cannot remove a series from its files.)"""
        if self._multiprocess_dir is not None:
            return
        for name in credentials:
            self.get_token.remove_by_labels({"tenant": tenant, "credentials": name})
        if requests:
            self.requests.remove_by_labels({"tenant": tenant})
            for labels in [labels for labels in self._counters if labels[-1] == tenant]:
                del self._counters[labels]

    def route(self, path: str, route: str | None) -> str:
        """The route group of a request for `path` that went along `route` (its prefix; None:
        no route served it): the longest SOBOT_METRICS_ROUTES prefix it starts with, else the
        route's prefix, else `other`."""
        # Not cached: paths are the clients' choice, up to 8 KiB each, and a cache of them would
        # grow by the megabyte under a scan; matching a few prefixes costs next to nothing.
        if self._routes and route is not None:
            for prefix in self._routes:
                if path.startswith(prefix):
                    return prefix
        return route or "other"

    def observe(self, record: RequestRecord, duration_s: float) -> None:
        """Count one finished request."""
        route = self.route(record.path, record.route)
        method = record.method if record.method in METHODS else "other"
        status = "cancelled" if record.status is None else str(record.status)
        tenant = record.tenant or "none"  # a configured name: bounded
        labels = (route, method, status, self._ret_code_label(record.ret_code), tenant)
        # The labelled children are looked up once per label set, not on every request:
        # prometheus-client's labels() validates and locks each time (a third of the cost).
        counter = self._counters.get(labels)
        if counter is None:
            counter = self._counters[labels] = self.requests.labels(*labels)
        counter.inc()
        per_route = self._per_route.get(route)
        if per_route is None:
            per_route = self._per_route[route] = _RouteMetrics(
                self.duration.labels(route),
                self.upstream_duration.labels(route),
                self.replays.labels(route),
            )
        per_route.duration.observe(duration_s)
        if record.attempts:
            per_route.upstream_duration.observe(record.upstream_s)
        if record.attempts > 1:
            per_route.replays.inc()

    def _ret_code_label(self, ret_code: str | None) -> str:
        if ret_code is None:
            return "none"
        if ret_code in self._ret_codes:
            return ret_code
        if len(self._ret_codes) >= MAX_RET_CODES or not _RET_CODE.fullmatch(ret_code):
            return "other"
        self._ret_codes.add(ret_code)
        return ret_code

    def page(self) -> bytes:
        """The metrics in Prometheus' text format."""
        registry = self._registry
        if self._multiprocess_dir is not None:
            # Every worker's counts, summed from their files; the token is this worker's.
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
            registry.register(self._token)
        return generate_latest(registry)


@dataclass(frozen=True, slots=True)
class _RouteMetrics:
    duration: Histogram
    upstream_duration: Histogram
    replays: Counter


class _TokenCollector(Collector):
    """Each credential set's token's remaining life, read at scrape time."""

    def __init__(self) -> None:
        self.expires_in: dict[tuple[str, str], Callable[[], float | None]] = {}

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            f"{NAMESPACE}_token_expires_in_seconds",
            "Seconds until the token a credential set of a tenant holds now expires (0: no "
            "valid token); a tenant shows from its first use",
            labels=["tenant", "credentials"],
        )
        for (tenant, name), expires_in in self.expires_in.items():
            family.add_metric([tenant, name], max(0.0, expires_in() or 0.0))
        yield family
