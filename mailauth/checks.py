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
    for section, key, path in files:
        if path is not None and not os.access(path, os.R_OK):
            problems.append(f"{cfg.path}: [{section}] {key}: {path}: cannot be read")
    for listener in cfg.listeners:
        needsTLS = cfg.auth.plaintext_requires_tls
        if listener.tls == "none" and listener.auth == "required" and needsTLS:
            problems.append(
                f"{cfg.path}: [listener:{listener.name}] auth: required, but with tls = none "
                "and plaintext_requires_tls = yes nobody could log in"
            )
    return problems
