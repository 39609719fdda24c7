"""
The C{mailauth queue} commands (list, flush, delete) on the queue's folder,
safe while the daemon runs: every envelope rewrite holds the queue's lock.
"""

from __future__ import annotations

import os

import attrs

from mailauth.durable import writeDurably
from mailauth.spool import Spool, UnreadableEnvelope, validID


def listQueue(directory: str) -> list:
    """
    Every queued message, oldest first, as a dict: C{id}, C{sender},
    C{arrival}, C{next_attempt} (POSIX times), C{attempts}, C{size},
    C{last_error}, and C{recipients}: a list of dicts with C{address},
    C{state}, C{reply} and C{error}.
    """
    return readQueue(directory)[0]


def readQueue(directory: str) -> tuple[list, list]:
    """
    The queued messages as L{listQueue} gives them, and those that cannot
    be sent because their envelope cannot be read, as C{(ID, why)}, by ID:
    the ones the daemon has set aside (C{ID.corrupt}) and the ones it has
    not met yet. C{mailauth queue delete ID} removes either.
    """
    spool = Spool(directory)
    messages = []
    unreadable = [(msgid, "set aside as unreadable") for msgid in spool.setAsideIDs()]
    for msgid in spool.ids():
        try:
            envelope = spool.load(msgid)
        except UnreadableEnvelope as e:
            unreadable.append((msgid, f"its envelope is unreadable: {e}"))
            continue
        if envelope is None:
            continue
        messages.append(
            {
                "id": envelope.id,
                "sender": envelope.sender,
                "arrival": envelope.arrival,
                "next_attempt": envelope.nextAttempt,
                "attempts": envelope.attempts,
                "size": envelope.size,
                "last_error": envelope.lastError,
                "recipients": [
                    {"address": r.address, "state": r.state, "reply": r.reply, "error": r.error}
                    for r in envelope.recipients
                ],
            }
        )
    messages.sort(key=lambda m: (m["arrival"], m["id"]))
    return messages, sorted(unreadable)


def flushQueue(directory: str) -> int:
    """
    Make every queued message due now, and tell a running daemon, which
    notices within C{queue_interval}.

    @return: how many messages there are.
    """
    spool = Spool(directory)
    if not spool.exists():
        return 0
    count = 0
    for msgid in spool.ids():
        if spool.update(msgid, lambda e: attrs.evolve(e, nextAttempt=0.0)) is not None:
            count += 1
    try:
        owner = os.stat(spool.directory)
        writeDurably(spool.flushPath, b"", owner)
    except FileExistsError:
        pass
    return count


def deleteMessage(directory: str, msgid: str) -> bool:
    """
    Remove message C{msgid} from the queue without a bounce.

    @return: whether there was such a message.
    """
    spool = Spool(directory)
    if not validID(msgid) or not spool.exists():
        return False
    with spool.locked():
        return spool.remove(msgid)
