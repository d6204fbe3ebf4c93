"""Tenants as they are served: which tenant a request is for, and each tenant's credential sets
and routes, built when the tenant is first used.

    Tenants     every configured tenant by name; `default` built at start-up, a named tenant
                when its first request is forwarded or its first token request passes the
                sign check (a dict lookup per request once built)
    Tenant      one tenant's CredentialSets (its token managers and stores) and its RouteTable
                (the shared prefixes, bound to its main upstream and its sets)

Which tenant (`name_for_request`): with client keys, the key's tenant, and an X-Sobot-Tenant
that names another is refused (403); without client keys, X-Sobot-Tenant names it, else
`default`. A name no tenant has is 404. The header is the proxy's own: never sent upstream
(headers.py). Only the name is resolved then: the handler checks the request against the shared
prefixes, the tenant's configured sets and the allow-lists first, and builds the tenant only to
forward it (or to answer a token request whose sign verified), so a refused request starts
nothing.

A client's own token request names an appid: `claimant` finds the tenant with a set of that
kind and appid, and that set's credential to check the request's sign with, from an index
built over every tenant, started or not (at start-up and at each reload: `reconfigure`): a
request that fails the check starts nothing.

A reload (`reconfigure`) changes the tenants set by set (`SetChanges`): a set whose kind, appid
and token upstream stay keeps its token manager and the token it holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from proxy.config.routes import DEFAULT_CREDENTIALS, CredentialSettings
from proxy.config.tenants import DEFAULT_TENANT, TenantSettings
from proxy.errors import Forbidden, UnknownTenant
from proxy.server.credentials import CredentialSet, CredentialSets
from proxy.server.routing import RouteTable
from proxy.sobot.credential import Credential, names, spelling
from proxy.tokens.manager import TokenManager

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

    def rebuild(self, tenant: Tenant, config: TenantSettings, changes: SetChanges) -> Rebuilt:
        """The started `tenant` as `config` has it (`changes`: its sets' changes from what it
        was), not yet in force: nothing it returns is started and no source is switched (see
        `commit`)."""
        ...

    def commit(self, rebuilt: Rebuilt) -> None:
        """Put `rebuilt` in force: the kept sets' sources sign with their new credentials, the
        new sets start."""
        ...


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """A started tenant as a new configuration has it, worked out but not yet in force.
    `fresh`: its new sets (made, not started); `rekeyed`: kept sets (the same manager, source
    and store) with a new credential, for their sources to switch to; `retired`: the sets
    replaced or removed."""

    tenant: Tenant
    fresh: tuple[CredentialSet, ...] = ()
    rekeyed: tuple[CredentialSet, ...] = ()
    retired: tuple[CredentialSet, ...] = ()


def token_identity(config: CredentialSettings, tenant: TenantSettings) -> tuple[str, str, str]:
    """What a set's token depends on: its kind, appid and token upstream (the base URL its
    token call goes to). A set whose identity a reload leaves alone keeps its manager."""
    return config.kind, config.appid, config.base_url or tenant.base_url


@dataclass(frozen=True, slots=True)
class SetChanges:
    """How the sets of one tenant differ between two configurations, by name: `kept` the
    same identity (`token_identity`), `rekeyed` those of them whose credential changed (the
    secret, the authorization scheme), `rebuilt` a changed identity, `added` and `removed`."""

    kept: frozenset[str]
    rekeyed: frozenset[str]
    rebuilt: frozenset[str]
    added: frozenset[str]
    removed: frozenset[str]

    @classmethod
    def between(cls, before: TenantSettings, after: TenantSettings) -> SetChanges:
        old = {config.name: config for config in before.credential_sets}
        new = {config.name: config for config in after.credential_sets}
        kept = frozenset(
            name
            for name, config in new.items()
            if name in old and token_identity(old[name], before) == token_identity(config, after)
        )
        return cls(
            kept=kept,
            rekeyed=frozenset(
                name
                for name in kept
                if (old[name].secret, old[name].authorization_scheme)
                != (new[name].secret, new[name].authorization_scheme)
            ),
            rebuilt=frozenset(name for name in new if name in old and name not in kept),
            added=frozenset(name for name in new if name not in old),
            removed=frozenset(name for name in old if name not in new),
        )


@dataclass(frozen=True, slots=True)
class RetiredSet:
    """A set a reconfiguration replaced or removed; `successor`: the manager now serving the
    same kind and appid, if a started tenant has one (a replay is handed to it)."""

    tenant: str
    managed: CredentialSet
    successor: TokenManager | None


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """What a reconfiguration changed: tenants added and removed; the sets ("tenant/set") added
    to or removed from a tenant that stays, rebuilt (a new kind, appid or token upstream: a new
    token manager) and rekeyed (a new secret or authorization scheme: the same manager);
    the tenants whose main upstream changed (their routes go there now); and `retired`: the
    started sets replaced or removed, for the caller to retire."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    sets_added: tuple[str, ...] = ()
    sets_removed: tuple[str, ...] = ()
    sets_rebuilt: tuple[str, ...] = ()
    rekeyed: tuple[str, ...] = ()
    upstreams_changed: tuple[str, ...] = ()
    retired: tuple[RetiredSet, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether anything changed at all."""
        return any(
            (
                self.added,
                self.removed,
                self.sets_added,
                self.sets_removed,
                self.sets_rebuilt,
                self.rekeyed,
                self.upstreams_changed,
            )
        )


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
        """Serve `configs` (every tenant, `default` first) from now on, set by set: a set whose
        kind, appid and token upstream are the same keeps its manager, source and store (and
        the token held; a new secret signs the next token call), a set that changed otherwise
        or was added gets a new manager, and one changed or removed is returned as retired.
        A started tenant's routes are bound again to its sets; a tenant not started yet is
        built from its new configuration on its first use; a removed one is dropped.

        All is worked out first (`Builder.rebuild`): if that raises, nothing has changed.
        Then put in force in one step, synchronously on the event loop: a request sees the
        tenants as they were or as they are, never a mix."""
        configs_now = {config.name: config for config in configs}
        assert DEFAULT_TENANT in configs_now
        assert DEFAULT_TENANT in self._started
        removed = [name for name in self._configs if name not in configs_now]
        added = [name for name in configs_now if name not in self._configs]
        sets_added, sets_removed, sets_rebuilt, rekeyed, upstreams = [], [], [], [], []
        started: dict[str, Tenant] = {}
        plans: list[Rebuilt] = []
        for name, config in configs_now.items():
            before = self._configs.get(name)
            if before is None or before == config:
                if name in self._started:
                    started[name] = self._started[name]
                continue
            changes = SetChanges.between(before, config)
            sets_added += [f"{name}/{each}" for each in sorted(changes.added)]
            sets_removed += [f"{name}/{each}" for each in sorted(changes.removed)]
            sets_rebuilt += [f"{name}/{each}" for each in sorted(changes.rebuilt)]
            rekeyed += [f"{name}/{each}" for each in sorted(changes.rekeyed)]
            if before.base_url != config.base_url:
                upstreams.append(name)
            tenant = self._started.get(name)
            if tenant is not None:
                plan = self._builder.rebuild(tenant, config, changes)
                plans.append(plan)
                started[name] = plan.tenant
        index = _kind_index(configs_now)
        # Everything is worked out: from here on nothing raises, and nothing is awaited.
        for plan in plans:
            self._builder.commit(plan)
        retired = [
            (name, managed)
            for name in removed
            if name in self._started
            for managed in self._started[name].sets
        ]
        retired += [(plan.tenant.name, managed) for plan in plans for managed in plan.retired]
        started = {DEFAULT_TENANT: started.pop(DEFAULT_TENANT), **started}  # `default` first
        self._kind_index, self._token_kinds, self._set_kinds = index
        self._configs = configs_now
        self._started = started
        self.default = started[DEFAULT_TENANT]
        successors = (
            {
                (managed.credential.kind, managed.credential.appid): managed.tokens
                for tenant in started.values()
                for managed in tenant.sets
            }
            if retired
            else {}
        )
        return Reconfigured(
            added=tuple(added),
            removed=tuple(removed),
            sets_added=tuple(sets_added),
            sets_removed=tuple(sets_removed),
            sets_rebuilt=tuple(sets_rebuilt),
            rekeyed=tuple(rekeyed),
            upstreams_changed=tuple(upstreams),
            retired=tuple(
                RetiredSet(
                    name,
                    managed,
                    successors.get((managed.credential.kind, managed.credential.appid)),
                )
                for name, managed in retired
            ),
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
            credential = credentials.credential()
            by_appid = index.setdefault(credentials.kind, {})
            by_appid[credentials.appid] = (config.name, credentials.name, credential)
            set_kinds.setdefault(credentials.name, credential)
    kinds = tuple(next(iter(by_appid.values()))[2] for by_appid in index.values())
    return index, kinds, set_kinds
