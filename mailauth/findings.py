"""What the checks of a configuration found (L{mailauth.checks}), and where."""

from __future__ import annotations

from typing import Optional

import attrs

from mailauth import config as configmod


@attrs.frozen
class Findings:
    """
    What the checks found, each a line ready to print.

    @ivar errors: what stops the daemon from starting.
    @ivar warnings: what it starts with but complains about; each line
        says C{warning:}.
    @ivar notes: what was not checked, and why (check-config only).
    """

    errors: tuple = ()
    warnings: tuple = ()
    notes: tuple = ()

    def __add__(self, other: Findings) -> Findings:
        return Findings(
            self.errors + other.errors, self.warnings + other.warnings, self.notes + other.notes
        )


def place(cfg: configmod.Config, section: str, key: Optional[str] = None) -> str:
    return f"{cfg.path}: [{section}]" + (f" {key}" if key else "")
