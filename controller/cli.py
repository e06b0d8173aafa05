"""``avika-controller``: placeholder until the controller lands (issue 13)."""

import sys


def main() -> None:
    print("avika-controller is not built yet", file=sys.stderr)
    sys.exit(1)
