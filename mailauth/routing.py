"""
Where mail goes and who may send it: the L{Router} maps recipients to local
Maildirs or the forward queue, through the aliases (and the postmaster),
and decides which sender addresses a login may use.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer

from mailauth.addresses import domainKey, normalise
from mailauth.addressmap import AddressMap
from mailauth.interfaces import IUserDatabase
from mailauth.maildir import maildirPath

# How deep aliases may point at aliases before we call it a loop.
MAX_ALIAS_DEPTH = 10


class Router:
    """
    Knows which domains are local, who exists, what aliases expand to and
    who may send as whom. Shared by every delivery. The aliases and the
    sender map are in memory; users are looked up in the L{IUserDatabase},
    so the answers are Deferreds. Addresses are compared by their key
    (L{normalise}): quoting, case and the A- or U-label form of a domain
    make no difference.

    @ivar postmaster: where postmaster@ each local domain goes (RFC 5321
        4.5.1; the session turns C{<Postmaster>} into postmaster@ a local
        domain) unless a user or an alias of that exact address takes it;
        L{None} to leave it to users and aliases alone.
    @ivar headerFromMatch: every C{From:} and C{Sender:} address of an
        authenticated submission must be one its login may use as MAIL
        FROM (L{mayUseSender}).
    """

    def __init__(
        self,
        *,
        localDomains,
        maildirTemplate: str,
        users: IUserDatabase,
        aliases: AddressMap,
        senderMap: AddressMap,
        senderLoginMatch: bool,
        postmaster: Optional[str] = None,
        headerFromMatch: bool = False,
    ) -> None:
        self.localDomains = frozenset(domainKey(domain) for domain in localDomains)
        self.maildirTemplate = maildirTemplate
        self.users = users
        self.aliases = aliases
        self.senderMap = senderMap
        self.senderLoginMatch = senderLoginMatch
        self.postmaster = normalise(postmaster) if postmaster else None
        self.headerFromMatch = headerFromMatch

    def isLocal(self, address: str) -> bool:
        return normalise(address).rpartition("@")[2] in self.localDomains

    def exists(self, login: str) -> defer.Deferred[bool]:
        """Whether the user database has C{login}."""
        return self.users.lookup(login).addCallback(lambda user: user is not None)

    @defer.inlineCallbacks
    def expand(self, address: str):
        """
        Resolve C{address} through the aliases.

        @return: a Deferred firing with C{(local logins, remote addresses)};
            both empty if the address is local and names nobody.
        """
        local: list = []
        remote: list = []
        seen: set = set()
        # Depth first, in the order the aliases name their targets; each
        # address as written, compared by its key.
        stack = [(address, 0)]
        while stack:
            written, depth = stack.pop()
            addr = normalise(written)
            if addr in seen or depth > MAX_ALIAS_DEPTH:
                continue
            seen.add(addr)
            if not self.isLocal(addr):
                remote.append(_remoteAddress(written))
                continue
            if (yield self.exists(addr)):
                local.append(addr)
                continue
            postmaster = self._postmasterFor(addr)
            if postmaster is not None:
                targets: tuple = (postmaster,)
            else:
                targets = self.aliases.written(addr)
            stack.extend((target, depth + 1) for target in reversed(targets))
        return _unique(local), _unique(remote)

    def _postmasterFor(self, address: str) -> Optional[str]:
        """
        L{postmaster} if C{address} (normalised, local, no user) is a
        postmaster address that goes there: no alias line names it exactly
        (a catch-all C{@domain} does not count: postmaster mail must reach
        a person); else L{None}.
        """
        if self.postmaster is None or address.rpartition("@")[0] != "postmaster":
            return None
        if any(key == address for key, _ in self.aliases.items()):
            return None
        return self.postmaster

    def maildirFor(self, login: str) -> str:
        """
        The Maildir of C{login}, by the template.

        @raise UnsafeMailbox: if the login cannot name a folder under the
            template's fixed start (L{maildirPath}); the caller logs it,
            since the user database holds a login that should never have
            got in.
        """
        return maildirPath(self.maildirTemplate, login)

    def mayUseSender(self, login: str, sender: str) -> defer.Deferred[bool]:
        """
        Whether C{login} may use C{sender} in MAIL FROM: its own address, an
        alias that leads to it, or an address (or C{@domain}) granted to it
        in the sender map.

        @return: a Deferred firing with a L{bool} (already fired for the
            login's own address and the sender map, which ask no database).
        """
        sender = normalise(sender)
        login = normalise(login)
        if sender == login or login in self.senderMap.get(sender):
            return defer.succeed(True)
        if not self.isLocal(sender):
            return defer.succeed(False)
        return self._aliasLeadsTo(login, sender)

    @defer.inlineCallbacks
    def _aliasLeadsTo(self, login: str, sender: str):
        """Whether the local C{sender} is an alias (not a user) that leads to C{login}."""
        local, _ = yield self.expand(sender)
        return login in local and not (yield self.exists(sender))


def _remoteAddress(written: str) -> str:
    """
    An address in another domain as an alias names it: the local part as
    written (only that domain may fold its case, RFC 5321 2.4), the domain
    as L{domainKey} makes it.
    """
    local, _, domain = written.strip().rpartition("@")
    return f"{local}@{domainKey(domain)}"


def _unique(items: list) -> tuple:
    return tuple(dict.fromkeys(items))
