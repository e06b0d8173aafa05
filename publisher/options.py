"""Options shared by several ``avika-publish`` commands, declared once (DESIGN section 6).

Each is a decorator; ``signing_options`` bundles what every command that signs takes. Callbacks
turn text into values (durations, keys, ``PLATFORM=PATH``) so commands receive checked data and
bad input exits 2 with click's usage message.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.config import parse_duration
from agent.manifest import PublicKey, parse_public_keys

F = TypeVar("F", bound=Callable[..., Any])


def _apply(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def wrap(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return wrap


def duration(ctx: click.Context | None, param: click.Parameter | None, value: str) -> timedelta:
    """A click callback: a DURATION of at least 1s (``30s``, ``12h``, ``1d12h``)."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds < 1:
        raise click.BadParameter("must be at least 1s")
    return timedelta(seconds=seconds)


def _public_keys(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[PublicKey]:
    keys: list[PublicKey] = []
    for value in values:
        try:
            keys += [k for k in parse_public_keys(value) if k not in keys]
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return keys


def _binaries(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        platform, sep, path = value.partition("=")
        if not sep or not platform or not path:
            raise click.BadParameter(f"{value!r} is not PLATFORM=PATH (e.g. linux-amd64=dist/avika-agent)")
        if platform in out:
            raise click.BadParameter(f"platform {platform!r} given twice")
        out[platform] = Path(path)
    return out


store_option = click.option(
    "--store",
    envvar="AVIKA_STORE",
    default="./updates",
    show_default=True,
    metavar="URL",
    help="Where releases go: s3://bucket/prefix, file:///abs/path or a directory (env AVIKA_STORE).",
)
url_option = click.option(
    "--url",
    metavar="URL",
    help="Read over HTTP(S) instead: the directory URL that holds manifest.json (what agents fetch).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Compute and print everything; write nothing.")
expires_option = click.option(
    "--expires-in",
    default="30d",
    show_default=True,
    callback=duration,
    metavar="DURATION",
    help="How long the signed manifest stays valid (30s, 12h, 30d, 1d12h).",
)
binary_option = click.option(
    "--binary",
    "binaries",
    multiple=True,
    callback=_binaries,
    metavar="PLATFORM=PATH",
    help="A binary to publish, e.g. linux-amd64=dist/avika-agent-linux-amd64 (repeatable).",
)
reports_option = click.option(
    "--reports",
    envvar="AVIKA_REPORTS",
    metavar="URL",
    help="Reports store: sqlite:///PATH or dynamodb://TABLE (env AVIKA_REPORTS).",
)


def public_key_option(purpose: str, required: bool = False) -> Callable[[F], F]:
    return click.option(
        "--public-key",
        "public_keys",
        multiple=True,
        required=required,
        envvar="AVIKA_PUBLIC_KEYS",
        callback=_public_keys,
        metavar="KEY",
        help=purpose + " Base64 Ed25519 key; repeatable or comma-separated (env AVIKA_PUBLIC_KEYS).",
    )


endpoint_option = click.option(
    "--endpoint-url",
    metavar="URL",
    help="S3-compatible endpoint for an s3:// store (AWS_ENDPOINT_URL works too).",
)

key_options = _apply(
    click.option(
        "--key",
        "key_files",
        multiple=True,
        envvar="AVIKA_SIGNING_KEY",
        metavar="KEY",
        help="Ed25519 private key file (PEM) to sign with (env AVIKA_SIGNING_KEY).",
    ),
    click.option(
        "--kms-key-id",
        "kms_key_ids",
        multiple=True,
        envvar="AVIKA_KMS_KEY_ID",
        metavar="ID",
        help="AWS KMS Ed25519 key to sign with (env AVIKA_KMS_KEY_ID).",
    ),
)
"""``--key | --kms-key-id``: the signing key (and so a key whose envelopes are believed)."""

signing_options = _apply(
    key_options,
    store_option,
    click.option(
        "--cloudfront-distribution",
        envvar="AVIKA_CLOUDFRONT_DISTRIBUTION_ID",
        metavar="ID",
        help="CloudFront distribution whose /manifest.json is invalidated after a publish "
        "(env AVIKA_CLOUDFRONT_DISTRIBUTION_ID).",
    ),
    endpoint_option,
    dry_run_option,
    json_option,
)
"""``--key | --kms-key-id``, ``--store``, ``--cloudfront-distribution``, ``--endpoint-url``,
``--dry-run``, ``--json``: every command that signs takes these."""

trusted_key_option = click.option(
    "--trusted-key",
    "--public-key",
    "public_keys",
    multiple=True,
    envvar="AVIKA_PUBLIC_KEYS",
    callback=_public_keys,
    metavar="KEY",
    help="Also believe store envelopes signed by this key (e.g. the old key after a rotation); "
    "the signing key's own are always believed. Base64 Ed25519; repeatable or comma-separated "
    "(env AVIKA_PUBLIC_KEYS).",
)
"""Every command that reads the store: only envelopes that verify with these keys or the signer's
count (DESIGN section 2, "The store is not trusted by the publisher")."""

resign_options = _apply(signing_options, trusted_key_option)
"""What ``release``, ``rollout``, ``halt``, ``refresh``, ``rollback-to`` and ``canary --halt`` share."""

source_options = _apply(store_option, url_option, endpoint_option)
"""``--store`` (with ``--endpoint-url``) or ``--url``: where ``show`` and ``verify`` read from."""
