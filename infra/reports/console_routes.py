"""Which paths are the operator API's (DESIGN section 9), known without importing it.

The Lambda's handler and `avika-publish serve` both ask this before importing the console
(publisher modules, cryptography): `/v1/reports` never pays for them.
"""

from __future__ import annotations

FLEET_PATH = "/v1/fleet"
AGENTS_PREFIX = "/v1/agents/"
RELEASES_PATH = "/v1/releases"
ROLLOUT_PATH = "/v1/rollout"
HALT_PATH = "/v1/halt"
EXACT = frozenset({FLEET_PATH, RELEASES_PATH, ROLLOUT_PATH, HALT_PATH})


def is_console_path(path: str) -> bool:
    """True for the operator API's routes (the agent id after /v1/agents/ may hold slashes)."""
    return path in EXACT or (path.startswith(AGENTS_PREFIX) and len(path) > len(AGENTS_PREFIX))
