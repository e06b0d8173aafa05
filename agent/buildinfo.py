"""What the build embedded: the agent's version and its trusted public keys.

`make agent-binary VERSION=V PUBLIC_KEYS=k1,k2` writes ``agent/_embedded.py`` into the
executable; a source checkout has none and runs as a development version with no keys.
Keys embedded here are used when ``UPDATE_PUBLIC_KEYS`` is unset (DESIGN section 2: rotation
without touching hosts, as Sparkle embeds its key in the app).
"""

from __future__ import annotations

import contextlib

VERSION = "0.0.0.dev0"
PUBLIC_KEYS = ""

with contextlib.suppress(ImportError):  # a source checkout is not a built binary
    from agent._embedded import PUBLIC_KEYS, VERSION  # type: ignore[no-redef]  # noqa: F401
