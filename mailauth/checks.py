"""
What a configuration needs beyond its text: files that must exist and be
readable, certificates that must load. Both C{mailauth check-config} and
the daemon's start run these checks, so the one predicts the other.
"""

from __future__ import annotations

import os

from mailauth import config as configmod
from mailauth.pgusers import checkSetup, isPostgreSQL
from mailauth.tls import ReloadableTLS, TLSError


def checkFiles(cfg: configmod.Config) -> list:
    """
    What L{configmod.load} cannot see from the text alone: the certificate
    and key load and match, the users file and maps are readable, the state
    directory can be made.

    @return: one line per problem.
    """
    problems = []
    if cfg.tls is not None:
        try:
            ReloadableTLS(cfg.tls.certificate, cfg.tls.private_key)
        except TLSError as e:
            problems.append(f"{cfg.path}: [tls]: {e}")
    usersFile = None if isPostgreSQL(cfg.auth.users) else cfg.auth.users
    if usersFile is None and (problem := checkSetup(cfg.auth.users)) is not None:
        problems.append(f"{cfg.path}: [auth] users: {problem}")
    files = [("auth", "users", usersFile), ("delivery", "aliases", cfg.delivery.aliases),
             ("delivery", "sender_map", cfg.delivery.sender_map)]
    if cfg.relay is not None:
        files.append(("relay", "password_file", cfg.relay.password_file))
        files.append(("relay", "ca_file", cfg.relay.ca_file))
    if cfg.oauth is not None:
        files.append(("oauth", "jwks", cfg.oauth.jwks))
        files.append(("oauth", "introspection_secret_file", cfg.oauth.introspection_secret_file))
    for section, key, path in files:
        if path is not None and not os.access(path, os.R_OK):
            problems.append(f"{cfg.path}: [{section}] {key}: {path}: cannot be read")
        elif (section, key) == ("oauth", "jwks") and path is not None:
            problems.extend(f"{cfg.path}: [oauth] jwks: {p}" for p in _jwksProblems(path))
    for listener in cfg.listeners:
        needsTLS = cfg.auth.plaintext_requires_tls
        if listener.tls == "none" and listener.auth == "required" and needsTLS:
            problems.append(
                f"{cfg.path}: [listener:{listener.name}] auth: required, but with tls = none "
                "and plaintext_requires_tls = yes nobody could log in"
            )
    return problems


def _jwksProblems(path: str) -> list:
    """Why the JWKS file at C{path} gives no key to check tokens with, if it does not."""
    from mailauth.oauth import parseJWKS

    try:
        with open(path, "rb") as f:
            parseJWKS(f.read())
    except (OSError, ValueError) as e:
        return [f"{path}: {e.strerror if isinstance(e, OSError) else e}"]
    return []


def warnings(cfg: configmod.Config) -> list:
    """
    What may not work as the configuration means, yet does not stop the
    daemon: C{[auth] rehash = yes} with a users file the daemon cannot
    replace (the Debian unit mounts /etc read-only). Checked as the user
    running the check; the daemon logs them at start too.

    @return: one line per warning.
    """
    found = []
    if cfg.auth.rehash and not isPostgreSQL(cfg.auth.users):
        folder = os.path.dirname(os.path.abspath(cfg.auth.users))
        if not os.access(folder, os.W_OK):
            found.append(
                f"{cfg.path}: [auth] rehash: the users file's folder {folder} is not writable,"
                " so no password can be rehashed; keep the users file where the daemon may"
                " write (e.g. /var/lib/mailauth/users)"
            )
    return found
