"""The publisher's errors: one base, and the exit code each kind means (DESIGN section 6).

``cli.py`` maps them to an exit status once; everything below it raises, never exits.
0 ok, 1 operational failure (disk, network, AWS), 2 usage or refused input, 3 verification failed.
"""

from __future__ import annotations


class PublishError(Exception):
    """An operation failed for operational reasons (store, network, AWS): exit 1."""

    exit_code = 1
    code = "publish_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Refused(PublishError):
    """Invalid input, or a publish refused to protect the fleet (e.g. new bytes for a version): exit 2."""

    exit_code = 2
    code = "refused"


class VerificationFailed(PublishError):
    """What the store serves does not verify (signature, expiry, size, checksum): exit 3."""

    exit_code = 3

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
