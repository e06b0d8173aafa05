"""What the controller image embedded at build time: its version and its trusted public keys.

``packaging/kubernetes/Dockerfile`` writes ``controller/_embedded.py`` (build args ``VERSION`` and
``PUBLIC_KEYS``); a source checkout has none. Embedded keys are used when ``AVIKA_PUBLIC_KEYS`` is
unset, as the agent binary's are (DESIGN section 2).
"""

from __future__ import annotations

import contextlib

VERSION = "0.0.0.dev0"
PUBLIC_KEYS = ""

with contextlib.suppress(ImportError):  # a source checkout is not a built image
    from controller._embedded import PUBLIC_KEYS, VERSION  # type: ignore[no-redef]  # noqa: F401
