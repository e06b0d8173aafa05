"""``avika-publish``: thin click commands over ``publisher.release`` (DESIGN section 6, contract).

Each command checks its input, calls one function that does the work and prints the result.
Errors are mapped to exit codes here, once: 1 operational failure, 2 usage or refused input,
3 verification failed; always one line on stderr, never a traceback (``AVIKA_DEBUG=1`` shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from agent.manifest import Manifest, ManifestError, Signer, format_time, parse_time
from infra.reports.auth import ConfigError, make_token, parse_secrets
from infra.reports.validation import MODES, STATES, valid_agent_id
from publisher import fleet as fleet_view
from publisher import fleet_text
from publisher import inspect as inspection
from publisher import plan as planning
from publisher import progress as progressing
from publisher import release as publishing
from publisher import resign as resigning
from publisher.archive import read_store
from publisher.errors import PublishError
from publisher.options import (
    binary_option,
    duration,
    endpoint_option,
    expires_option,
    json_option,
    key_options,
    public_key_option,
    reports_option,
    resign_options,
    source_options,
    store_option,
    trusted_key_option,
)
from publisher.signing import load_signers, write_new_key
from publisher.store_url import open_reader, open_store
from publisher.stores import DirStore, Store


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # `avika-publish show | head`: the reader left; nothing more to say to it.
            sys.stderr.close()
            raise click.exceptions.Exit(0) from None
        except PublishError as exc:
            _fail(exc.message, exc.exit_code)
        except ManifestError as exc:
            _fail(f"{exc.code}: {exc.message}", 3)
        except OSError as exc:
            _fail(str(exc), 1)
        except Exception as exc:
            if os.environ.get("AVIKA_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (AVIKA_DEBUG=1 shows the traceback)", 1)


def _fail(message: str, code: int) -> None:
    click.echo(f"avika-publish: error: {message}", err=True)
    raise click.exceptions.Exit(code)


def _note(message: str) -> None:
    click.echo(f"avika-publish: note: {message}", err=True)


def _warn(message: str) -> None:
    click.echo(f"avika-publish: warning: {message}", err=True)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@contextlib.contextmanager
def _bar(label: str, total: int) -> Iterator[publishing.Advance]:
    with click.progressbar(length=max(total, 1), label=label, file=sys.stderr) as bar:
        yield bar.update


def _progress() -> publishing.Progress:
    """A progress bar only when a person watches stderr."""
    return _bar if sys.stderr.isatty() else publishing.no_progress


def _publishing(
    dry_run: bool,
    key_files: tuple[str, ...],
    kms_key_ids: tuple[str, ...],
    store: str,
    cloudfront_distribution: str | None,
    endpoint_url: str | None,
) -> tuple[Store, list[Signer], publishing.Invalidate | None]:
    """The store, the signers and the CDN invalidation every signing command works with."""
    target = open_store(store, endpoint_url=endpoint_url)
    signers = [] if dry_run and not (key_files or kms_key_ids) else load_signers(key_files, kms_key_ids)
    if isinstance(target, DirStore):
        if cloudfront_distribution:
            _note("--cloudfront-distribution is ignored for a file store (nothing to invalidate)")
        if endpoint_url:
            _note("--endpoint-url is ignored for a file store")
        return target, signers, None
    if not cloudfront_distribution:
        return target, signers, None
    from publisher.cdn import CloudFrontInvalidator  # boto3 only for commands that use AWS
    from publisher.s3store import S3Store

    prefix = target.prefix if isinstance(target, S3Store) else ""
    return target, signers, CloudFrontInvalidator(cloudfront_distribution, prefix, note=_note)


def _summary(manifest: Manifest) -> list[str]:
    left = manifest.expires - datetime.now(UTC)
    expiry = f"in {left.days}d {left.seconds // 3600}h" if left.total_seconds() > 0 else "EXPIRED"
    lines = [
        f"version      {manifest.version}",
        f"serial       {manifest.serial}",
        f"released_at  {format_time(manifest.released_at)}",
        f"expires      {format_time(manifest.expires)} ({expiry})",
        f"rollout      {manifest.rollout.percent}% (salt {manifest.rollout.salt!r})",
        f"plan         {planning.describe_plan(manifest.rollout_plan) if manifest.rollout_plan else '-'}",
        f"min_version  {manifest.min_version or '-'}",
        f"downgrade    {'yes' if manifest.downgrade else 'no'}",
        f"image        {manifest.container_image or '-'}",
        f"reports_url  {manifest.reports_url or '-'}",
    ]
    if manifest.changelog:
        lines.append(f"changelog    {manifest.changelog.splitlines()[0]}")
    lines.append("binaries")
    for platform, b in sorted(manifest.binaries.items()):
        lines.append(f"  {platform:<14} {b.size:>11} bytes  sha256 {b.sha256}  {b.url}")
    return lines


def _format_history(location: str, keys: list, rows: list[dict[str, Any]]) -> str:
    def signers(row: dict[str, Any]) -> str:
        ids = row["verified_by"] if row["verified"] else row["key_ids"]
        return ",".join(k[:12] for k in ids) or "-"

    lines = [
        f"{location}: archived manifests, newest first (trusted: {', '.join(k.keyid[:12] for k in keys)})"
    ]
    lines += fleet_view.table(
        ("SERIAL", "VERSION", "ROLLOUT", "RELEASED", "SIGNED", "EXPIRES", "SIGNERS", "VERIFIES", "LIVE"),
        (
            (
                r["serial"],
                None if r["version"] is None else r["version"] + (" (downgrade)" if r["downgrade"] else ""),
                None if r["rollout"] is None else f"{r['rollout']}%",
                r["released_at"],
                r["signed_at"],
                r["expires"],
                signers(r),
                "yes" if r["verified"] else f"NO ({r['error']})",
                ("live" if r["live"] else None) if r["key"] != "manifest.json" else "live (manifest.json)",
            )
            for r in rows
        ),
    )
    bad = sum(1 for r in rows if not r["verified"])
    if bad:
        lines += ["", f"{bad} object(s) do not verify: never used by the publisher (shown as they claim)"]
    return "\n".join(lines) + "\n"


def _print_outcome(outcome: publishing.Outcome, as_json: bool) -> None:
    for warning in outcome.warnings:
        _warn(warning)
    if as_json:
        _print_json(outcome.to_json())
        return
    m = outcome.manifest
    if outcome.status == "unchanged":
        for note in outcome.notes:
            click.echo(note)
        return
    verb = {"published": "published", "dry_run": "dry run: would publish"}[outcome.status]
    click.echo(f"{verb} {m.version} as serial {m.serial} to {outcome.location}")
    would = "would " if outcome.status == "dry_run" else ""
    for key in outcome.uploaded:
        click.echo(f"  {would}upload   {key}")
    for key in outcome.present:
        click.echo(f"  present  {key}")
    for key in outcome.written:
        click.echo(f"  {would}write    {key}")
    for line in _summary(m):
        click.echo(f"  {line}")
    if outcome.status == "dry_run":
        click.echo("payload:")
        click.echo(json.dumps(m.to_dict(), indent=2))
    for note in outcome.notes:
        _note(note)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="avika-updates", prog_name="avika-publish")
def main() -> None:
    """Publish signed releases for the Avika agent fleet (DESIGN.md section 6)."""


@main.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the new private key (PEM, mode 0600); never overwritten.",
)
@json_option
def keygen(out: Path, as_json: bool) -> None:
    """Generate an Ed25519 signing key; print its public key and key id."""
    public = write_new_key(out)
    if as_json:
        _print_json({"path": str(out), "public_key": public.b64, "key_id": public.keyid})
    else:
        click.echo(f"public key: {public.b64}")
        click.echo(f"key id:     {public.keyid}")
        _note(f"wrote {out} (mode 0600); agents trust the public key via UPDATE_PUBLIC_KEYS")


@main.command()
@click.argument("version")
@binary_option
@click.option(
    "--image", metavar="REF", help="Container image of this release (also written to helm-values.yaml)."
)
@click.option(
    "--image-digest",
    metavar="sha256:HEX",
    help="The image's digest (needs --image): the controller pins repository@sha256:... with it.",
)
@click.option("--min-version", metavar="V", help="Agents below this update now, whatever their wave.")
@click.option("--changelog", default="", help="Release notes (text).")
@click.option(
    "--changelog-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Release notes file.",
)
@click.option(
    "--rollout",
    "rollout_percent",
    type=click.IntRange(0, 100),
    default=100,
    show_default=True,
    metavar="PERCENT",
    help="Share of agents in the first wave (with --plan: its first step).",
)
@click.option(
    "--rollout-salt", metavar="S", help="Wave salt (default: the version, so each release picks anew)."
)
@expires_option
@click.option("--downgrade", is_flag=True, help="Sign a deliberate rollback to an older version.")
@click.option(
    "--reports-url",
    metavar="URL",
    help="Where agents report: https (http only to loopback); default: kept from the newest release that "
    "verifies; '' for none.",
)
@click.option("--force", is_flag=True, help="Allow replacing the binaries of an already published version.")
@click.option(
    "--drop-platform",
    "drop_platforms",
    multiple=True,
    metavar="PLATFORM",
    help="Stop shipping PLATFORM, which the current release has (repeatable).",
)
@click.option(
    "--init", is_flag=True, help="The store is new: allow the first release into it (else refused)."
)
@click.option(
    "--plan",
    "plan_steps",
    metavar="STEPS",
    help="Roll out by itself through these percents, e.g. 1,10,50,100 (the first is the starting "
    "percent; `avika-publish progress` takes the next step when the current one has soaked and is healthy).",
)
@click.option(
    "--soak",
    default=planning.DEFAULT_SOAK,
    show_default=True,
    metavar="DURATION",
    help="With --plan: how long each step runs before the next (30m, 2h, 1d).",
)
@click.option(
    "--max-failure-rate",
    "plan_max_failure_rate",
    default=planning.DEFAULT_MAX_FAILURE_RATE,
    show_default=True,
    metavar="R",
    help="With --plan: above this share of failed or rolled-back attempts, progress halts the release.",
)
@click.option(
    "--min-agents",
    "plan_min_agents",
    type=int,
    default=planning.DEFAULT_MIN_AGENTS,
    show_default=True,
    metavar="N",
    help="With --plan: ended attempts needed to advance (at most 90 % of the agents in the wave).",
)
@click.option(
    "--no-inspect",
    is_flag=True,
    help="Do not check that each binary is an agent build of VERSION for its platform trusting this "
    "release's keys (a foreign build, e.g. a Go agent).",
)
@resign_options
@click.pass_context
def release(
    ctx: click.Context,
    version: str,
    binaries: dict[str, Path],
    image: str | None,
    image_digest: str | None,
    min_version: str | None,
    changelog: str,
    changelog_file: Path | None,
    rollout_percent: int,
    rollout_salt: str | None,
    expires_in: Any,
    downgrade: bool,
    reports_url: str | None,
    force: bool,
    drop_platforms: tuple[str, ...],
    init: bool,
    plan_steps: str | None,
    soak: str,
    plan_max_failure_rate: str,
    plan_min_agents: int,
    no_inspect: bool,
    public_keys: list,
    dry_run: bool,
    as_json: bool,
    **signing: Any,
) -> None:
    """Publish VERSION: upload binaries, sign the manifest, make it live.

    With --plan the release rolls itself out: `avika-publish progress`, run on a schedule, takes
    the next step when the current one has soaked and enough agents are healthy, and halts the
    release when the failure rate passes --max-failure-rate."""
    if not binaries:
        raise click.UsageError("at least one --binary PLATFORM=PATH is required")
    if changelog and changelog_file:
        raise click.UsageError("give --changelog or --changelog-file, not both")
    if changelog_file:
        changelog = changelog_file.read_text(encoding="utf-8")
    rollout_plan, rollout_percent = _release_plan(
        ctx, plan_steps, soak, plan_max_failure_rate, plan_min_agents, rollout_percent
    )
    spec = publishing.ReleaseSpec(
        version=version,
        binaries=binaries,
        image=image,
        image_digest=image_digest,
        min_version=min_version,
        changelog=changelog,
        rollout_percent=rollout_percent,
        rollout_salt=rollout_salt,
        expires_in=expires_in,
        downgrade=downgrade,
        reports_url=reports_url,
        force=force,
        drop_platforms=frozenset(drop_platforms),
        init=init,
        rollout_plan=rollout_plan,
    )
    store, signers, invalidate = _publishing(dry_run, **signing)
    unchecked = inspection.check_release(binaries, version, signers, inspect_files=not no_inspect)
    outcome = publishing.release(
        store,
        signers,
        spec,
        trusted=public_keys,
        dry_run=dry_run,
        progress=_progress(),
        invalidate=invalidate,
    )
    _print_outcome(outcome, as_json)
    if unchecked and outcome.status == "published":
        _note(unchecked)


@main.command(name="inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def inspect_command(file: Path, as_json: bool) -> None:
    """Print an agent file's build metadata (avika-build.json), read without running it.

    Exit 2 if FILE is not an agent build. `--json`: the metadata, plus `file` and `native`
    (machine -> number of native libraries inside).
    """
    build = inspection.inspect(file)
    if as_json:
        _print_json(build.to_json())
    else:
        click.echo("\n".join(inspection.describe(build)))


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


def _release_plan(
    ctx: click.Context, steps: str | None, soak: str, max_failure_rate: str, min_agents: int, percent: int
) -> tuple[Any, int]:
    """(the rollout plan or None, the starting percent): ``--plan`` sets the percent; ``--rollout``
    may repeat the first step, never contradict it; the plan's thresholds need ``--plan``."""
    if steps is None:
        extra = [
            f"--{name.replace('_', '-')}"
            for name, param in (
                ("soak", "soak"),
                ("max_failure_rate", "plan_max_failure_rate"),
                ("min_agents", "plan_min_agents"),
            )
            if _given(ctx, param)
        ]
        if extra:
            raise click.UsageError(f"{', '.join(extra)} set a rollout plan's thresholds: give --plan too")
        return None, percent
    try:
        plan = planning.plan_from_options(steps, soak, max_failure_rate, min_agents)
    except PublishError as exc:
        raise click.UsageError(exc.message) from None
    if _given(ctx, "rollout_percent") and percent != plan.steps[0]:
        raise click.UsageError(
            f"--rollout {percent} disagrees with --plan {steps}: the plan's first step is the starting "
            f"percent ({plan.steps[0]}); drop --rollout or make it {plan.steps[0]}"
        )
    return plan, plan.steps[0]


def _resign(
    percent: int | None, expires_in: Any, public_keys: list, dry_run: bool, as_json: bool, **signing: Any
) -> None:
    store, signers, invalidate = _publishing(dry_run, **signing)
    outcome = resigning.resign(
        store,
        signers,
        percent=percent,
        expires_in=expires_in,
        trusted=public_keys,
        dry_run=dry_run,
        invalidate=invalidate,
    )
    _print_outcome(outcome, as_json)


@main.command()
@click.argument("percent", type=click.IntRange(0, 100))
@expires_option
@resign_options
def rollout(percent: int, **kwargs: Any) -> None:
    """Re-sign the live manifest with a new rollout PERCENT (serial + 1, salt kept).

    Already at PERCENT: nothing is signed (exit 0, it says so)."""
    _resign(percent, **kwargs)


@main.command()
@expires_option
@resign_options
def halt(**kwargs: Any) -> None:
    """Stop the rollout: re-sign the live manifest at rollout 0 (already halted: nothing signed)."""
    _resign(0, **kwargs)


@main.command()
@expires_option
@resign_options
def refresh(**kwargs: Any) -> None:
    """Re-sign the live manifest with a new expiry (for a scheduled job)."""
    _resign(None, **kwargs)


@main.command(name="rollback-to")
@click.argument("version")
@click.option(
    "--rollout",
    "rollout_percent",
    type=click.IntRange(0, 100),
    default=100,
    show_default=True,
    metavar="PERCENT",
    help="Share of agents that go back (waves as for any release).",
)
@click.option(
    "--reports-url", metavar="URL", help="Where agents report (default: the live release's; '' for none)."
)
@expires_option
@resign_options
def rollback_to(
    version: str,
    rollout_percent: int,
    reports_url: str | None,
    expires_in: Any,
    public_keys: list,
    dry_run: bool,
    as_json: bool,
    **signing: Any,
) -> None:
    """Roll the fleet back to an older, archived VERSION (serial + 1, downgrade: true).

    The newest archived manifest of VERSION that verifies is signed again; its binaries in the store
    are re-hashed first (missing or different bytes: refused, exit 2)."""
    store, signers, invalidate = _publishing(dry_run, **signing)
    outcome = resigning.rollback_to(
        store,
        signers,
        version,
        percent=rollout_percent,
        expires_in=expires_in,
        trusted=public_keys,
        reports_url=reports_url,
        dry_run=dry_run,
        progress=_progress(),
        invalidate=invalidate,
    )
    _print_outcome(outcome, as_json)


@main.command()
@key_options
@trusted_key_option
@store_option
@endpoint_option
@json_option
def history(
    key_files: tuple[str, ...],
    kms_key_ids: tuple[str, ...],
    public_keys: list,
    store: str,
    endpoint_url: str | None,
    as_json: bool,
) -> None:
    """Every archived serial: version, rollout, times, signers, and whether it verifies.

    Trusted keys: the signing key's (--key / --kms-key-id; only its public half is used) and
    --trusted-key / AVIKA_PUBLIC_KEYS."""
    keys = list(public_keys)
    if key_files or kms_key_ids:
        keys = publishing.trusted_keys(load_signers(key_files, kms_key_ids), keys)
    if not keys:
        raise click.UsageError(
            "no trusted key: pass --trusted-key KEY (or AVIKA_PUBLIC_KEYS), or --key / --kms-key-id"
        )
    view = read_store(open_store(store, endpoint_url=endpoint_url), keys)
    rows = view.history()
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo(f"no archived manifests in {view.location}")
        return
    click.echo(_format_history(view.location, keys, rows), nl=False)


@main.command()
@source_options
@json_option
def show(store: str, url: str | None, endpoint_url: str | None, as_json: bool) -> None:
    """Print the live manifest (decoded without checking signatures; use verify for that).

    A release with a rollout plan also shows the current step and when the next one is due
    (--json: "plan_status", beside the payload's fields)."""
    reader = open_reader(store, url, endpoint_url=endpoint_url)
    manifest = publishing.show(reader)
    status = progressing.show_status(reader, manifest)
    if as_json:
        shown = manifest.to_dict()
        if status is not None:
            shown["plan_status"] = status  # not a payload field: where the plan stands (DESIGN section 6)
        _print_json(shown)
        return
    click.echo(f"{reader.location}/manifest.json (unverified: signatures not checked; use verify)")
    lines = _summary(manifest)
    if status is not None:
        at = next(i for i, line in enumerate(lines) if line.startswith("plan ")) + 1
        lines[at:at] = planning.format_status(status)
    for line in lines:
        click.echo(line)


@main.command()
@public_key_option("Trusted key.", required=True)
@click.option(
    "--threshold", type=click.IntRange(min=1), default=1, show_default=True, help="Distinct keys needed."
)
@source_options
@json_option
def verify(
    public_keys: list, threshold: int, store: str, url: str | None, endpoint_url: str | None, as_json: bool
) -> None:
    """Verify the live manifest as an agent would, then re-read every binary and check it."""
    if threshold > len(public_keys):
        raise click.BadParameter(
            f"{threshold} exceeds the {len(public_keys)} key(s) given", param_hint="--threshold"
        )
    report = publishing.verify(
        open_reader(store, url, endpoint_url=endpoint_url),
        public_keys,
        threshold=threshold,
        progress=_progress(),
    )
    if as_json:
        _print_json(report.to_json())
    elif report.manifest is not None:
        m = report.manifest
        click.echo(f"manifest serial {m.serial} ({m.version}) verified; expires {format_time(m.expires)}")
        for b in report.binaries:
            click.echo(f"  {b.platform:<14} {'ok' if b.error is None else b.error:<17} {b.url}")
    for code, message in report.failures:
        click.echo(f"avika-publish: error: {code}: {message}", err=True)
    raise click.exceptions.Exit(report.exit_code)


@main.command()
@click.argument("agent_id")
@json_option
def enroll(agent_id: str, as_json: bool) -> None:
    """Print AGENT_ID's report token (UPDATE_REPORT_TOKEN); fleet secret from AVIKA_FLEET_SECRET."""
    if not valid_agent_id(agent_id):
        raise click.BadParameter(
            f"{agent_id!r}: 1-128 characters of A-Z a-z 0-9 . _ : @ / + = -", param_hint="AGENT_ID"
        )
    try:
        secret = parse_secrets(os.environ.get("AVIKA_FLEET_SECRET"))[0]
    except ConfigError as exc:
        raise click.UsageError(f"AVIKA_FLEET_SECRET: {exc}") from None
    token = make_token(secret, agent_id)
    if as_json:
        _print_json({"agent_id": agent_id, "token": token})
    else:
        click.echo(token)


@main.command()
@click.argument("agent_id", required=False)
@reports_option
@click.option(
    "--stale-after",
    default="3h",
    show_default=True,
    callback=duration,
    metavar="DURATION",
    help="An agent with no report (heartbeats included) for this long is silent (stale).",
)
@click.option("--state", type=click.Choice(STATES), help="Only agents in this state.")
@click.option("--version", "version_filter", metavar="V", help="Only agents running this version.")
@click.option("--mode", type=click.Choice(MODES), help="Only VM or container agents.")
@click.option("--stale", is_flag=True, help="Only agents that went silent (see --stale-after).")
@click.option("--update-available", is_flag=True, help="Only agents with an update available.")
@json_option
def fleet(
    agent_id: str | None,
    reports: str | None,
    stale_after: Any,
    state: str | None,
    version_filter: str | None,
    mode: str | None,
    stale: bool,
    update_available: bool,
    as_json: bool,
) -> None:
    """Agents, versions and states from the reports store: who has an update available, who went
    silent, what failed. With AGENT_ID: that agent's history (oldest first)."""
    if agent_id is not None and not valid_agent_id(agent_id):
        raise click.BadParameter(
            f"{agent_id!r}: 1-128 characters of A-Z a-z 0-9 . _ : @ / + = -", param_hint="AGENT_ID"
        )
    where = fleet_view.FleetFilter(
        state=state,
        version=version_filter,
        mode=mode,
        stale=True if stale else None,
        update_available=True if update_available else None,
    )
    colour = not as_json and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    now = datetime.now(UTC)
    store = fleet_view.open_reports(reports)
    try:
        if agent_id is not None:
            history = fleet_view.agent_history(store, agent_id, now=now, stale_after=stale_after)
            if history is None:
                raise PublishError(f"no reports from agent {agent_id!r} in {reports}")
            if as_json:
                _print_json(history)
            else:
                click.echo(fleet_text.format_agent(history, now=now, colour=colour), nl=False)
            return
        view = fleet_view.read_fleet(store, now=now, stale_after=stale_after, where=where)
    finally:
        store.close()
    if as_json:
        _print_json(view)
    else:
        view["filtered"] = where != fleet_view.FleetFilter()
        click.echo(fleet_text.format_fleet(view, now=now, stale_after=stale_after, colour=colour), nl=False)


@main.command()
@click.argument("version")
@reports_option
@click.option(
    "--max-failure-rate",
    type=click.FloatRange(0, 1),
    required=True,
    metavar="R",
    help="Highest healthy share of ended attempts that failed or rolled back (0.05 = 5 %).",
)
@click.option(
    "--min-agents",
    type=click.IntRange(min=1),
    required=True,
    metavar="N",
    help="Ended attempts needed for a verdict; fewer is a hold (exit 4), never a pass.",
)
@click.option("--halt", "halt_rollout", is_flag=True, help="Over the threshold: re-sign at rollout 0.")
@expires_option
@resign_options
def canary(
    version: str,
    reports: str | None,
    max_failure_rate: float,
    min_agents: int,
    halt_rollout: bool,
    expires_in: Any,
    public_keys: list,
    dry_run: bool,
    as_json: bool,
    **signing: Any,
) -> None:
    """Judge VERSION's rollout from reports: exit 0 healthy, 4 hold (too few), 5 over the threshold."""
    if halt_rollout and not dry_run and not (signing["key_files"] or signing["kms_key_ids"]):
        raise click.UsageError("--halt re-signs the manifest: pass --key KEY or --kms-key-id ID")
    version = fleet_view.canonical_version(version)
    store = fleet_view.open_reports(reports)
    try:
        outcomes = fleet_view.read_outcomes(store, version)
    finally:
        store.close()
    report = fleet_view.evaluate_canary(
        version, outcomes, max_failure_rate=max_failure_rate, min_agents=min_agents
    )
    refused: PublishError | None = None
    if halt_rollout and report.exit_code == fleet_view.EXIT_FAIL:
        target, signers, invalidate = _publishing(dry_run, **signing)
        try:
            report.halt = fleet_view.halt(
                target,
                signers,
                version,
                expires_in=expires_in,
                trusted=public_keys,
                dry_run=dry_run,
                invalidate=invalidate,
            )
        except PublishError as exc:
            refused = exc
    if report.halt is not None and report.halt.outcome is not None:
        for warning in report.halt.outcome.warnings:  # objects in the store that did not verify
            _warn(warning)
    if as_json:
        _print_json(report.to_json())
    else:
        click.echo(fleet_view.format_canary(report), nl=False)
    if refused is not None:
        raise refused
    raise click.exceptions.Exit(report.exit_code)


def _now_option(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@reports_option
@expires_option
@resign_options
@click.option("--now", "now", hidden=True, callback=_now_option, help="Tests: the time it is (RFC 3339).")
def progress(
    reports: str | None,
    expires_in: Any,
    public_keys: list,
    dry_run: bool,
    as_json: bool,
    now: datetime | None,
    **signing: Any,
) -> None:
    """Take one step of the live release's rollout plan (release --plan); run it on a schedule.

    \b
    Reads the live, verified release and, when the plan needs them, the agents' reports:
      no_plan, complete  nothing to do (exit 0)
      halted             at rollout 0: waits for a person (`rollout N` resumes; exit 0)
      halted_now         failure rate above the plan's: re-signed at rollout 0 (exit 5)
      waiting            the step's soak is not over (exit 0; next_at says until when)
      hold               soak over, too few ended attempts to judge (exit 4)
      advanced           re-signed at the next step (exit 0)
    Idempotent: a second run right after signs nothing; of two concurrent runs one advances."""
    if not dry_run and not (signing["key_files"] or signing["kms_key_ids"]):
        raise click.UsageError("progress re-signs the manifest: pass --key KEY or --kms-key-id ID")
    if dry_run and not (signing["key_files"] or signing["kms_key_ids"] or public_keys):
        raise click.UsageError(
            "no trusted key: pass --key / --kms-key-id, or --trusted-key KEY with --dry-run"
        )
    target, signers, invalidate = _publishing(dry_run, **signing)
    result = progressing.take_step(
        target,
        signers,
        lambda: fleet_view.open_reports(reports),
        trusted=public_keys,
        expires_in=expires_in,
        now=now,
        dry_run=dry_run,
        invalidate=invalidate,
    )
    for warning in result.warnings:
        _warn(warning)
    for lost in result.lost:
        _note(lost)
    if as_json:
        _print_json(result.to_json())
    else:
        click.echo(progressing.format_result(result), nl=False)
    raise click.exceptions.Exit(result.exit_code)


@main.command()
@click.option(
    "--root",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Store directory.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port."
)
@reports_option
@click.option(
    "--console",
    is_flag=True,
    help="Also serve the web console (/console/) and the operator API (/v1/fleet, /v1/releases, ...);"
    " tokens from AVIKA_CONSOLE_TOKENS (name:scope:secret, comma-separated).",
)
@click.option(
    "--key",
    "key_files",
    multiple=True,
    envvar="AVIKA_SIGNING_KEY",
    metavar="KEY",
    help="With --console: the key that signs rollout and halt (env AVIKA_SIGNING_KEY).",
)
@click.option(
    "--kms-key-id",
    "kms_key_ids",
    multiple=True,
    envvar="AVIKA_KMS_KEY_ID",
    metavar="ID",
    help="With --console: an AWS KMS key instead (env AVIKA_KMS_KEY_ID).",
)
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="With --console: the release store it shows and re-signs (default: --root).",
)
@public_key_option("With --console: also trust the live manifest signed by this key.")
def serve(
    root: Path,
    host: str,
    port: int,
    reports: str | None,
    console: bool,
    key_files: tuple[str, ...],
    kms_key_ids: tuple[str, ...],
    store_url: str | None,
    public_keys: list,
) -> None:
    """Serve a store directory like a CDN (ETag, Range, Cache-Control), plus POST /v1/reports;
    with --console, the web console and the operator API."""
    from publisher.serve import run

    mount = None
    if console:
        from publisher.console_app import make_console

        mount = make_console(
            reports,
            store_url or str(root),
            key_files=key_files,
            kms_key_ids=kms_key_ids,
            public_keys=public_keys,
        )
        if not (key_files or kms_key_ids):
            _note("--console without --key or --kms-key-id: the console shows, but cannot roll out or halt")
    run(root, host, port, reports, console=mount)


@main.command("console-upload")
@click.option(
    "--store",
    envvar="AVIKA_STORE",
    required=True,
    metavar="s3://BUCKET[/PREFIX]",
    help="The release store's bucket; the page goes to console/ at its root (env AVIKA_STORE).",
)
@click.option("--endpoint-url", metavar="URL", help="S3-compatible endpoint (AWS_ENDPOINT_URL works too).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; upload nothing.")
@json_option
def console_upload(store: str, endpoint_url: str | None, dry_run: bool, as_json: bool) -> None:
    """Upload the web console's page to console/ in the bucket, for CloudFront to serve."""
    if not store.lower().startswith("s3://"):
        raise click.BadParameter(
            f"{store!r} is not an s3:// store; `avika-publish serve --console` serves the page itself",
            param_hint="--store",
        )
    from publisher.console_upload import upload_console
    from publisher.s3store import S3Store

    target = S3Store.from_url(store, endpoint_url=endpoint_url)
    done = upload_console(target.client, target.bucket, dry_run=dry_run)
    if as_json:
        _print_json({"bucket": target.bucket, "dry_run": dry_run, "files": [u.to_json() for u in done]})
        return
    verb = "would upload" if dry_run else "uploaded"
    for item in done:
        click.echo(f"{verb} s3://{target.bucket}/{item.key}  {item.content_type}  {item.size} bytes")
    click.echo(
        "the console is at https://<your CloudFront domain>/console/ (CloudFront sends /v1/* to the API)"
    )


if __name__ == "__main__":
    main()
