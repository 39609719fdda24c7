"""
The daemon's log lines: client text made safe for one line, and the
JSON format of C{[server] log_format = json} (one object a line).
"""

from __future__ import annotations

import signal
import sys
from typing import IO, Any, Mapping, cast

from twisted.logger import FileLogObserver, eventAsJSON, eventAsText
from twisted.python import logfile


def eventAsJSONLine(event: dict[str, Any]) -> str:
    """
    One log event as one line of JSON: twisted.logger's own encoding
    (L{eventAsJSON}, which L{twisted.logger.eventFromJSON} reads back), with
    every field the line was formatted from (C{client}, C{session},
    C{login}...), plus C{log_text}: the text the line shows in the text
    format, with the traceback of a failure.
    """
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    # eventAsJSON writes one line: it escapes every line break in the text.
    return eventAsJSON(dict(event, log_text=text)) + "\n"


def jsonFileObserver(outFile: IO[Any]) -> FileLogObserver:
    """A log observer writing each event to C{outFile} as L{eventAsJSONLine}."""
    return FileLogObserver(outFile, eventAsJSONLine)


class LogFormatError(Exception):
    """The log format cannot go where twistd was told to log; one line says why."""


def twistdLogsToStandardOutput(twistdOptions: Mapping[str, Any]) -> bool:
    """
    Whether twistd, by its options, writes its log lines itself to its
    standard output: C{--logfile=-} (or no C{--logfile}) with
    C{--nodaemon}, and neither C{--syslog} nor a C{--logger} of its own.
    """
    if twistdOptions.get("syslog") or twistdOptions.get("logger"):
        return False
    name = twistdOptions.get("logfile") or ""
    return bool(twistdOptions.get("nodaemon")) and name in ("", "-")


def twistdLogFile(twistdOptions: Mapping[str, Any]) -> IO[Any]:
    """
    The file twistd itself would log to, by its options: standard output
    for C{--logfile=-} (or no C{--logfile} with C{--nodaemon}), else the
    named file (default C{twistd.log}), rotated as twistd rotates it (at
    1 MB, and on SIGUSR1).

    The same choice twistd's C{UnixAppLogger} makes, which it keeps to
    itself; it is made here so that a JSON observer writes where the text
    one would.

    @param twistdOptions: twistd's own options (C{ServerOptions}).
    @raise LogFormatError: for C{--syslog}, and for standard output without
        C{--nodaemon} (twistd refuses that too).
    """
    if twistdOptions.get("syslog"):
        raise LogFormatError(
            "[server] log_format = json writes to --logfile; it does not work with --syslog"
        )
    name = twistdOptions.get("logfile") or ""
    nodaemon = twistdOptions.get("nodaemon")
    if name == "-" and not nodaemon:
        raise LogFormatError("Daemons cannot log to stdout, exiting!")
    if name == "-" or (nodaemon and not name):
        return sys.stdout
    out = logfile.LogFile.fromFullPath(name or "twistd.log")
    # As twistd does: SIGUSR1 rotates, unless something else handles it.
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum, frame) -> None:
            from twisted.internet import reactor

            cast(Any, reactor).callFromThread(out.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return out


def printable(text: str, limit: int = 128) -> str:
    """A login made safe for a one-line log entry: no control characters, no spaces, bounded."""
    out = "".join(c if 32 < ord(c) < 127 and c not in "<>\\" else f"\\x{ord(c):02x}" for c in text)
    return out[:limit]


def quoted(text: str, limit: int = 256) -> str:
    """Text for a C{key="..."} field of a log line: no control characters, no bare quote."""
    out = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\x{ord(c):02x}" for c in text)
    return out[:limit]
