"""systemd's notify protocol, standard library only (DESIGN section 4: ``Type=notify``, ``WatchdogSec=``).

Under the shipped unit (packaging/systemd) systemd gives the agent ``$NOTIFY_SOCKET``: a datagram
socket, a filesystem path or ``@name`` in the abstract namespace. ``run`` sends ``READY=1`` once it
has started (run lock taken, pid record written, the update in flight resumed) and ``WATCHDOG=1``
from its main loop, at least every half of ``$WATCHDOG_USEC``. The ping comes from the loop
itself, never from a thread of its own: a loop that hangs stops pinging, systemd kills the agent
and starts it again, and that start counts as a boot (the boot cap then rolls a hung release
back).

A step of the loop that may block longer than the watchdog for a good reason -- a manifest fetch
(``UPDATE_FETCH_TIMEOUT``), a download (``UPDATE_DOWNLOAD_TIMEOUT``) -- is itself bounded; the loop
announces that bound first (``WATCHDOG_USEC=``, systemd 236 and later) and puts the unit's own value
back afterwards (:meth:`Notifier.busy`). A hang inside such a step is caught once its bound is over.

``$WATCHDOG_PID``, when set, names the one process the watchdog is meant for: a child that
inherits the environment (the smoke test of a staged binary) never pings. Sending never raises and
never blocks: a notification that cannot be delivered is logged once and dropped (systemd may be
restarting; the agent goes on).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
# Ping at a third of the watchdog timeout: systemd asks for at least every half; the rest is slack
# for a loop iteration that does some work between two pings.
PING_FRACTION = 3


def socket_address(value: str) -> str | None:
    """The address to ``sendto``: a path, or ``\\0name`` for ``@name``; None if unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, empty, or a transport we do not speak (e.g. vsock:)


def _usec(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    usec = int(value)
    return usec if usec > 0 else None


class Notifier:
    """Notifications to systemd for this process; every method is a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_name = env.get(NOTIFY_SOCKET, "")
        self.address = socket_address(self.socket_name)
        usec = _usec(env.get(WATCHDOG_USEC))
        meant_for = env.get(WATCHDOG_PID, "").strip()
        mine = not meant_for or meant_for == str(os.getpid() if pid is None else pid)
        # The unit's watchdog timeout in µs, if it is ours to feed.
        self.watchdog_usec = usec if (usec is not None and mine and self.address is not None) else None
        self._extensions: list[int] = []
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def ping_interval(self) -> float | None:
        """Seconds between two pings of the loop, or None when there is no watchdog to feed."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 1e6 / PING_FRACTION

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=value`` lines; True if it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.socket_name, exc)
            return False
        return True

    def ready(self, status: str = "") -> None:
        """Started. Also puts the unit's watchdog timeout back, in case the previous image of this
        process (an ``exec`` restart) had stretched it for a download."""
        lines = ["READY=1"]
        if self.watchdog_usec is not None:
            lines += [f"{WATCHDOG_USEC}={self.watchdog_usec}", "WATCHDOG=1"]
        if status:
            lines.append(f"STATUS={status}")
        self.send(*lines)

    def ping(self) -> None:
        if self.watchdog_usec is not None:
            self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    @contextlib.contextmanager
    def busy(self, seconds: float) -> Iterator[None]:
        """A bounded step that may outlast the watchdog: stretch it to ``seconds`` for the step.

        Nothing is sent when the unit's own timeout is already longer. Nested steps stretch to the
        longest; leaving one puts back what was in force before it.
        """
        if self.watchdog_usec is None:
            yield
            return
        before = max([self.watchdog_usec, *self._extensions])
        wanted = max(before, int(seconds * 1e6))
        self._extensions.append(wanted)
        if wanted > before:
            self.send(f"{WATCHDOG_USEC}={wanted}", "WATCHDOG=1")
        try:
            yield
        finally:
            self._extensions.pop()
            if wanted > before:
                self.send(f"{WATCHDOG_USEC}={before}", "WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
