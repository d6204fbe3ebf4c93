"""Tenants as they are served: which tenant a request is for, and each tenant's credential sets
and routes, built when the tenant is first used.

    Tenants     every configured tenant by name; `default` built at start-up, a named tenant
                when its first request is forwarded (a dict lookup per request once built)
    Tenant      one tenant's CredentialSets (its token managers and stores) and its RouteTable
                (the shared prefixes, bound to its main upstream and its sets)

Which tenant (`name_for_request`): with client keys, the key's tenant, and an X-Sobot-Tenant
that names another is refused (403); without client keys, X-Sobot-Tenant names it, else
`default`. A name no tenant has is 404. The header is the proxy's own: never sent upstream
(headers.py). Only the name is resolved then: the handler checks the request against the shared
prefixes, the tenant's configured sets and the allow-lists first, and builds the tenant only to
forward it, so a refused request starts nothing.

A client's own token request names an appid: `claimant` finds the tenant with a set of that
kind and appid, and that set's credential to check the request's sign with, from an index
built over every tenant, started or not (at start-up and at each reload: `reconfigure`): a
request that fails the check starts nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from proxy.config.routes import DEFAULT_CREDENTIALS
from proxy.config.tenants import DEFAULT_TENANT, TenantSettings
from proxy.errors import Forbidden, UnknownTenant
from proxy.server.credentials import CredentialSets
from proxy.server.routing import RouteTable
from proxy.sobot.credential import Credential, names, spelling
from proxy.sobot.kinds import KINDS

HEADER: Final = "X-Sobot-Tenant"

# kind -> appid -> (tenant, set, credential)
_KindIndex = dict[str, dict[str, tuple[str, str, Credential]]]


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    sets: CredentialSets
    routes: RouteTable


class Builder(Protocol):
    def build(self, config: TenantSettings) -> Tenant:
        """A tenant's state, the tokens its routes use renewing from now on."""
        ...

    def rekeyed(self, tenant: Tenant, config: TenantSettings, changed: frozenset[str]) -> Tenant:
        """`tenant` as `config` has it, whose sets differ only in the secrets of `changed`."""
        ...


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """What a reconfiguration changed: tenants added, removed, rebuilt (an appid, an upstream,
    a set's kind, a set added or removed), and the sets ("tenant/set") whose secret alone
    changed; `retired`: the started tenants it replaced or removed, for the caller to retire."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rebuilt: tuple[str, ...] = ()
    rekeyed: tuple[str, ...] = ()
    retired: tuple[Tenant, ...] = ()


class Tenants:
    __slots__ = (
        "_builder",
        "_configs",
        "_kind_index",
        "_set_kinds",
        "_started",
        "_token_kinds",
        "default",
    )

    def __init__(self, configs: Sequence[TenantSettings], builder: Builder) -> None:
        """`configs`: every tenant, `default` first; `builder` makes a tenant's state. Builds
        `default` at once."""
        self._configs = {config.name: config for config in configs}
        self._builder = builder
        self._started: dict[str, Tenant] = {}
        self._kind_index, self._token_kinds, self._set_kinds = _kind_index(self._configs)
        default = self.get(DEFAULT_TENANT)
        assert default is not None
        self.default = default

    def reconfigure(self, configs: Sequence[TenantSettings]) -> Reconfigured:
        """Serve `configs` (every tenant, `default` first) from now on. A tenant whose settings
        are the same is left alone; one whose secrets alone changed keeps its token managers
        (and the tokens they hold: the next token call signs with the new secret); one changed
        otherwise is rebuilt, and a removed one dropped: the started ones are returned as
        `retired`. A rebuilt or added tenant starts on its first use, `default` at once.

        Synchronous, on the event loop: a request sees the tenants as they were or as they
        are, never a mix."""
        configs_now = {config.name: config for config in configs}
        started: dict[str, Tenant] = {}
        retired: list[Tenant] = []
        added, rebuilt, rekeyed = [], [], []
        removed = [name for name in self._configs if name not in configs_now]
        retired += [self._started[name] for name in removed if name in self._started]
        for name, config in configs_now.items():
            before = self._configs.get(name)
            tenant = self._started.get(name)
            if before is None:
                added.append(name)
            elif before == config:
                if tenant is not None:
                    started[name] = tenant
            elif _shape(before) != _shape(config):
                rebuilt.append(name)
                if tenant is not None:
                    retired.append(tenant)
            else:
                changed = frozenset(
                    old.name
                    for old, new in zip(before.credential_sets, config.credential_sets, strict=True)
                    if old.secret != new.secret
                )
                rekeyed += [f"{name}/{set_name}" for set_name in sorted(changed)]
                if tenant is not None:
                    started[name] = self._builder.rekeyed(tenant, config, changed)
        if DEFAULT_TENANT not in started:
            started[DEFAULT_TENANT] = self._builder.build(configs_now[DEFAULT_TENANT])
        started = {DEFAULT_TENANT: started.pop(DEFAULT_TENANT), **started}  # `default` first
        # One step each, nothing awaited in between: no request runs while they change.
        self._kind_index, self._token_kinds, self._set_kinds = _kind_index(configs_now)
        self._configs = configs_now
        self._started = started
        self.default = started[DEFAULT_TENANT]
        return Reconfigured(
            tuple(added), tuple(removed), tuple(rebuilt), tuple(rekeyed), tuple(retired)
        )

    @property
    def configured(self) -> int:
        return len(self._configs)

    def is_configured(self, name: str) -> bool:
        return name in self._configs

    def started(self) -> Iterator[Tenant]:
        """Every tenant built so far, `default` first."""
        return iter(tuple(self._started.values()))

    def get(self, name: str) -> Tenant | None:
        """The tenant `name`, built now if this is its first use; None: no such tenant."""
        tenant = self._started.get(name)
        if tenant is None:
            config = self._configs.get(name)
            if config is None:
                return None
            # Built synchronously, on the one event loop: never twice.
            tenant = self._started[name] = self._builder.build(config)
        return tenant

    def for_request(self, key_tenant: str | None, named: str | None) -> Tenant:
        """The tenant of a request, built now if this is its first use (see name_for_request)."""
        tenant = self.get(self.name_for_request(key_tenant, named))
        assert tenant is not None  # a configured name
        return tenant

    def name_for_request(self, key_tenant: str | None, named: str | None) -> str:
        """The name of a request's tenant, a configured one; nothing is built. `key_tenant`: the
        client key's (None: no client keys); `named`, what X-Sobot-Tenant says (None: no such
        header)."""
        if key_tenant is not None:
            if named is not None and named != key_tenant:
                raise Forbidden(f"the client key is not for the tenant {HEADER} names")
            return key_tenant
        name = DEFAULT_TENANT if named is None else named
        if name not in self._configs:
            # The name is the client's own: not echoed.
            raise UnknownTenant(
                f"{HEADER} names no tenant this proxy serves (names are case-sensitive)"
            )
        return name

    def built(self, name: str) -> Tenant | None:
        """The tenant `name` if it has started; nothing is built."""
        return self._started.get(name)

    def has_set(self, name: str, set_name: str) -> bool:
        """Whether the configured tenant `name` has a credential set `set_name`, started or not."""
        config = self._configs.get(name)
        return config is not None and (
            set_name == DEFAULT_CREDENTIALS
            or any(credentials.name == set_name for credentials in config.credentials)
        )

    def kind_of_set(self, set_name: str) -> Credential | None:
        """A credential of the kind the sets called `set_name` are (for an answer's shape)."""
        return self._set_kinds.get(set_name)

    def token_kind(self, path: str) -> Credential | None:
        """The kind whose token endpoint `path` is (in any spelling), among the kinds served."""
        spelled = spelling(path)  # once, for every kind
        for credential in self._token_kinds:
            if names(spelled, credential.token_path):
                return credential
        return None

    def claimant(self, kind: str, appid: str | None) -> tuple[str, str, Credential] | None:
        """(the tenant, the set's name, its credential) of the set of `kind` and `appid`, if
        a tenant has one; nothing is built."""
        if appid is None:
            return None
        return self._kind_index.get(kind, {}).get(appid)


def _kind_index(
    configs: Mapping[str, TenantSettings],
) -> tuple[_KindIndex, tuple[Credential, ...], dict[str, Credential]]:
    """Every set of every tenant by kind and appid (validation makes a kind's appids unique over
    all tenants); one credential of each kind, which answers "is this that kind's token path?"
    and refuses a request naming an appid no tenant has; and by set name, a credential of the
    kind that name has (validation gives a name one kind in every tenant)."""
    index: _KindIndex = {}
    set_kinds: dict[str, Credential] = {}
    for config in configs.values():
        for credentials in config.credential_sets:
            credential = KINDS[credentials.kind](
                credentials.appid, credentials.secret, credentials.authorization_scheme
            )
            by_appid = index.setdefault(credentials.kind, {})
            by_appid[credentials.appid] = (config.name, credentials.name, credential)
            set_kinds.setdefault(credentials.name, credential)
    kinds = tuple(next(iter(by_appid.values()))[2] for by_appid in index.values())
    return index, kinds, set_kinds


def _shape(config: TenantSettings) -> TenantSettings:
    """`config` without its secrets: what must stay the same for a tenant to keep its tokens."""
    return dataclasses.replace(
        config,
        app_key="",
        credentials=tuple(dataclasses.replace(each, secret="") for each in config.credentials),
    )
