"""What the build embedded (the agent's version and trusted keys), and what a build supports.

`make agent-binary VERSION=V PUBLIC_KEYS=k1,k2` writes ``agent/_embedded.py`` into the
executable; a source checkout has none and runs as a development version with no keys.
Keys embedded here are used when ``UPDATE_PUBLIC_KEYS`` is unset (DESIGN section 2: rotation
without touching hosts, as Sparkle embeds its key in the app).

``PYTHONS``, ``PLATFORMS`` and ``GLIBC`` are the one definition of what an agent file runs on
(DESIGN section 7): packaging/build_agent.py builds for exactly these, the file refuses other
interpreters with one line, and ``avika-publish`` checks a release against them.
"""

from __future__ import annotations

import contextlib

VERSION = "0.0.0.dev0"
PUBLIC_KEYS = ""

# CPython minor versions an agent file carries code for: RHEL 9 / Amazon Linux 2023 (3.9),
# Ubuntu 22.04 (3.10), Debian 12 (3.11), Ubuntu 24.04 (3.12), Debian 13 (3.13).
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
# The manifest's platform name -> the machine (``uname -m``) its native code is built for.
PLATFORMS = {"linux-amd64": "x86_64", "linux-arm64": "aarch64"}
# The oldest glibc the native code runs on (manylinux2014).
GLIBC = (2, 17)

with contextlib.suppress(ImportError):  # a source checkout is not a built binary
    from agent._embedded import PUBLIC_KEYS, VERSION  # type: ignore[no-redef]  # noqa: F401
