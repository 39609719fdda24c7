"""
The daemon's log lines: client text made safe for one line, and the
JSON format of C{[server] log_format = json} (one object a line).
"""

from __future__ import annotations

import signal
import string
import sys
from typing import IO, Any, Mapping, Optional, cast

from twisted.logger import (
    FileLogObserver,
    eventAsJSON,
    eventAsText,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
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


class ClassicText:
    """
    twistd's text lines (C{textFileLogObserver}'s
    L{formatEventAsClassicLogText}, to the byte), made for less CPU: each
    line cost a busy server about 50 us, most of it
    L{string.Formatter} filling the message's fields in Python, and a
    time zone and a datetime for its time.

    A message whose fields are all plain names (C{{login}}, C{{size:d}},
    C{{why!r}}: every line mailauth logs) is filled in by C{str.format_map}
    (the same rules, in C), then handed to Twisted's own formatting with
    nothing left to fill, which adds the time, the system and a traceback
    as it always does; anything else (attributes, indexes, C{()} calls,
    positional fields, a field that is missing) goes to Twisted as it is.
    The time is made once a second.
    """

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._time = ""
        self._plain: dict[str, bool] = {}

    def __call__(self, event: dict[str, Any]) -> Optional[str]:
        format = event.get("log_format")
        if type(format) is str and "log_flattened" not in event and self._onlyNames(format):
            try:
                text = format.format_map(event)
            except Exception:
                pass  # Twisted's formatting says how it fails
            else:
                filled = text.replace("{", "{{").replace("}", "}}")
                event = dict(event, log_format=filled)
        return formatEventAsClassicLogText(event, formatTime=self.formatTime)

    def _onlyNames(self, format: str) -> bool:
        """Whether every field of C{format} is a plain name, with a plain spec."""
        plain = self._plain.get(format)
        if plain is None:
            try:
                plain = all(
                    name is None
                    or (
                        name.isidentifier()
                        and "{" not in (spec or "")
                        and conversion in (None, "r", "s")
                    )
                    for _, name, spec, conversion in string.Formatter().parse(format)
                )
            except ValueError:
                plain = False
            if len(self._plain) < 1024:  # (formats are the code's: a few hundred)
                self._plain[format] = plain
        return plain

    def formatTime(self, when: Optional[float]) -> str:
        """
        L{formatTime} of twistd's lines (to the second), made once a second.
        Within a microsecond of the next second, where the datetime rounds
        up, it is made afresh.
        """
        if when is None:
            return formatTime(when, timeFormatRFC3339)
        second = int(when)
        if when - second >= 0.999999:
            return formatTime(when, timeFormatRFC3339)
        if second != self._second:
            self._time = formatTime(when, timeFormatRFC3339)
            self._second = second
        return self._time


def textFileObserver(outFile: IO[Any]) -> FileLogObserver:
    """A log observer writing twistd's text lines to C{outFile} (L{ClassicText})."""
    return FileLogObserver(outFile, ClassicText())


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
