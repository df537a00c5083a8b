"""``clickagg`` command line: a thin shell over the server and the HTTP API."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from rich.console import Console
from rich.table import Table

from clickagg.config import Settings
from clickagg.settings_loader import (
    CONFIG_ENV,
    SPECS,
    SettingsError,
    display_value,
    load_settings,
    parse_value,
)

DEFAULT_URL = "http://127.0.0.1:8000"
LOG_WAIT_S = 60
F = TypeVar("F", bound=Callable[..., Any])
_R = TypeVar("_R")


@click.group()
@click.version_option(package_name="clickagg")
def main() -> None:
    """clickagg: exactly-once ad-click aggregation."""


def _setting_flag(name: str, help_text: str, **kwargs: Any) -> Callable[[F], F]:
    """A ``serve`` flag for a setting: no default of its own (the ``Settings`` field's
    default applies when neither the flag, the environment nor the file sets it)."""
    spec = SPECS[name]
    assert spec.flag is not None
    default = display_value(spec, spec.default)
    kwargs.setdefault("metavar", _METAVARS.get(spec.kind))
    return click.option(
        spec.flag,
        name,
        default=None,
        callback=_parse_flag,
        help=f"{help_text}  [default: {default}; env {spec.env}]",
        **kwargs,
    )


_METAVARS = {"int": "INTEGER", "duration": "DURATION", "size": "SIZE", "str": "TEXT"}


def _parse_flag(ctx: click.Context, param: click.Parameter, value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return parse_value(SPECS[str(param.name)], value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class SettingsUsageError(click.ClickException):
    """A one-line ``Error: ...`` for unusable settings, with the usage-error exit code."""

    exit_code = 2


def _settings_options(command: F) -> F:
    """The options every command that runs part of clickagg takes: --config,
    --print-config and a flag per commonly set setting."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            help=f"TOML file of settings (keys as in the README).  [env {CONFIG_ENV}]",
        ),
        click.option(
            "--print-config",
            is_flag=True,
            help="Print the effective settings and where each came from, then exit.",
        ),
        _setting_flag(
            "data_dir",
            "Where the log, aggregates and snapshots live.",
            type=click.Path(path_type=Path),
        ),
        _setting_flag("host", "Where the API listens."),
        _setting_flag("port", "Where the API listens."),
        _setting_flag("partitions", "Log partitions (fixed when the data dir is created)."),
        _setting_flag(
            "allowed_lateness",
            "How far behind the max event time an event may arrive and still count.",
        ),
        _setting_flag("dedup_horizon", "How long (event time) the stream remembers ids."),
        _setting_flag(
            "ads_file",
            "Ad registry CSV (ad_id,cpc_micros,...): the click price when an event has no "
            "cost_micros.",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
        ),
        _setting_flag(
            "advertisers_file",
            "Advertisers CSV (advertiser_id,name,currency,time_zone): statement time zones.",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
        ),
        _setting_flag("log_level", "Server and worker log level."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _resolve_settings(
    config_file: Path | None, print_config: bool, flags: dict[str, object]
) -> Settings | None:
    """The effective settings (None after printing them for --print-config); a setting
    that cannot be used is a one-line error."""
    from clickagg.registry import RegistryError, load_cpc_micros

    try:
        loaded = load_settings(flags=flags, environ=os.environ, config_file=config_file)
    except SettingsError as exc:
        raise SettingsUsageError(str(exc)) from None
    if print_config:
        click.echo(loaded.to_toml(), nl=False)
        return None
    settings = loaded.settings
    from clickagg.runtime import roles

    try:
        roles.check(settings)
    except ValueError as exc:
        raise SettingsUsageError(str(exc)) from None
    if settings.ads_file is not None:
        try:
            load_cpc_micros(settings.ads_file)  # refuse a bad file now, not in the worker
        except RegistryError as exc:
            raise SettingsUsageError(f"{exc} ({loaded.sources['ads_file']})") from None
        settings = dataclasses.replace(settings, ads_file=settings.ads_file.resolve())
    if settings.advertisers_file is not None:
        from clickagg.registry import load_advertisers

        try:
            load_advertisers(settings.advertisers_file)
        except RegistryError as exc:
            raise SettingsUsageError(f"{exc} ({loaded.sources['advertisers_file']})") from None
        resolved = settings.advertisers_file.resolve()
        settings = dataclasses.replace(settings, advertisers_file=resolved)
    if settings.rules_file is not None:
        from clickagg.core.rules import RuleError
        from clickagg.core.rules.loading import load_rules

        try:
            load_rules(settings.rules_file)  # refuse a bad rules file now, not in the worker
        except RuleError as exc:
            raise SettingsUsageError(f"{exc} ({loaded.sources['rules_file']})") from None
        settings = dataclasses.replace(settings, rules_file=settings.rules_file.resolve())
    return settings


@main.command()
@_settings_options
@click.option(
    "--no-worker",
    is_flag=True,
    help="Serve HTTP only; run the stream workers with `clickagg worker` yourself.",
)
def serve(config_file: Path | None, print_config: bool, no_worker: bool, **flags: object) -> None:
    """Run ingest API, query API and stream workers on one machine, no services needed.

    Settings come from flags, then CLICKAGG_* environment variables, then the --config
    file, then the defaults (see the README's Configuration section)."""
    from clickagg.server import run_server

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is not None:
        run_server(settings, manage_worker=not no_worker)


@main.command()
@_settings_options
def worker(config_file: Path | None, print_config: bool, **flags: object) -> None:
    """Run the stream workers alone, in the foreground, on a data dir that `clickagg serve
    --no-worker` (or nothing) serves over HTTP. Stops on SIGTERM or Ctrl-C."""
    from clickagg.runtime.worker import run

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    meta = settings.log_dir / "meta.json"
    for waited in range(LOG_WAIT_S * 10):  # the log is created by the HTTP server
        if meta.exists():
            break
        if waited == 0:
            click.echo(f"waiting for `clickagg serve` to create the log in {settings.log_dir}")
        time.sleep(0.1)
    else:
        raise click.ClickException(f"no log in {settings.log_dir} after {LOG_WAIT_S} s")
    run(settings)


@main.command()
@click.option("--seconds", default=30, show_default=True, type=int)
@click.option("--rate", default=2_000, show_default=True, type=int, help="Events per second.")
@click.option("--port", default=0, type=int, help="Port (0: pick a free one).")
def demo(seconds: int, rate: int, port: int) -> None:
    """Start clickagg on a temporary data dir, send realistic traffic, show the counts."""
    from clickagg.cli.demo import run_demo

    run_demo(seconds=seconds, rate=rate, port=port)


def _get(url: str, path: str, params: dict[str, Any]) -> Any:
    try:
        response = httpx.get(url + path, params={k: v for k, v in params.items() if v}, timeout=30)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    if response.status_code >= 400:
        raise click.ClickException(f"{response.status_code}: {response.text}")
    return response.json()


@main.command()
@click.argument("ad_id")
@click.option("--url", default=DEFAULT_URL, show_default=True)
@click.option("--start", help="ISO-8601 or epoch s/ms.")
@click.option("--end", help="ISO-8601 or epoch s/ms (default now).")
@click.option("--last", help="Instead of --start: e.g. 7d, 1h.")
@click.option(
    "--granularity", type=click.Choice(["minute", "hour", "day"]), default="hour", show_default=True
)
@click.option("--group-by", type=click.Choice(["country", "device", "browser", "invalid_reason"]))
@click.option("--realtime", is_flag=True, help="Sliding windows ending now instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def query(
    ad_id: str,
    url: str,
    start: str | None,
    end: str | None,
    last: str | None,
    granularity: str,
    group_by: str | None,
    realtime: bool,
    as_json: bool,
) -> None:
    """Show an ad's aggregates."""
    if realtime:
        data = _get(url, f"/api/v1/ads/{ad_id}/metrics/realtime", {})
        rows = [
            {
                "window": f"last {suffix.replace('_', ' ')}",
                "clicks": data[f"clicks_last_{suffix}"],
                "impressions": data[f"impressions_last_{suffix}"],
                "spend": data[f"spend_last_{suffix}"],
            }
            for suffix in ("minute", "5_minutes", "hour")
        ]
    else:
        data = _get(
            url,
            "/aggregates",
            {
                "ad_id": ad_id,
                "start": start,
                "end": end,
                "last": last,
                "granularity": granularity,
                "group_by": group_by,
            },
        )
        rows = data
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    Console().print(rows_table(rows, title=f"{ad_id}"))


def rows_table(rows: list[dict[str, Any]], *, title: str) -> Table:
    table = Table(title=title)
    if not rows:
        table.add_column("no rows")
        return table
    columns = [key for key in rows[0] if key != "spend_micros"]  # final: batch-reconciled
    for key in columns:
        table.add_column(key, justify="left" if key in ("window", "ad_id") else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key in columns))
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@main.command()
@click.argument("event_id")
@click.option("--url", default=DEFAULT_URL, show_default=True)
def trace(event_id: str, url: str) -> None:
    """Say what happened to an event: partition, offset, status and reason (and, for a
    click the keyed stage corrected, the stream's first decision and the rule's evidence)."""
    try:
        response = httpx.get(f"{url}/events/{event_id}", timeout=30)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    data = response.json()
    if response.status_code == 404:
        click.echo(f"{event_id}: {data['detail']}")
        sys.exit(1)
    if response.status_code >= 400:
        raise click.ClickException(f"{response.status_code}: {response.text}")
    click.echo(
        f"{event_id}: {data['status']}"
        + (
            f" (partition {data['partition']}, offset {data['offset']})"
            if data.get("partition") is not None
            else ""
        )
    )
    if data.get("reason"):
        click.echo(f"  reason: {data['reason']}")
    history = data.get("history", [])
    if len(history) > 1:  # a later stage changed the stream's decision
        first = history[0]
        click.echo(
            f"  first: {first['status']} by the stream"
            + (f" ({first['reason']})" if first.get("reason") else "")
        )
        for later in history[1:]:
            moved = later.get("previous_rule_id")
            click.echo(
                f"  then: {later['status']} by the keyed stage at {later['corrected_at']} "
                f"(rule {later['rule_id']}"
                + (f", moved from rule {moved}" if moved else "")
                + f", keyed partition {later['keyed_partition']}, "
                f"offset {later['keyed_offset']})"
            )
            click.echo(f"  evidence: {later['evidence']}")
    for copy in data.get("copies", [])[1:]:
        click.echo(
            f"  copy at partition {copy['partition']}, offset {copy['offset']}: "
            f"{copy['status']} ({copy['reason']})"
        )


@main.group(name="log")
def log_group() -> None:
    """Check the durable log for damage, and repair it (see the README's Reliability)."""


def _log_tools(settings: Settings) -> tuple[dict[int, int], Callable[[int, int, int], Any]]:
    """The store's committed offsets (acknowledged for sure) and a rebuild from the
    archive, each where it can be had."""
    import pyarrow as pa

    from clickagg.archive.parquet import ParquetArchiveReader
    from clickagg.core import columns
    from clickagg.core.decisions import DECISION_SCHEMA

    floors: dict[int, int] = {}
    if settings.store_path.exists():
        try:
            from clickagg.store.duckdb_store import DuckDBStore

            store = DuckDBStore(settings.store_path)
        except Exception as exc:  # held by a running worker
            click.echo(f"note: store not read ({exc}); using the log's durable ends only")
        else:
            floors = dict(store.committed_offsets())
            store.close()
    archive = ParquetArchiveReader(settings.archive_dir)

    def rebuild(partition: int, start: int, end: int) -> pa.Table:
        decided = archive.decisions_at(partition, start, end)
        return columns.events_from_decisions(decided.cast(DECISION_SCHEMA))

    return floors, rebuild


@log_group.command(name="check")
@_settings_options
def log_check(config_file: Path | None, print_config: bool, **flags: object) -> None:
    """Read every frame of every partition and report damage; exit 1 if there is any.
    Safe beside a running server."""
    from clickagg.log.repair import check_log

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    floors, rebuild = _log_tools(settings)
    damaged = False
    for report in check_log(settings.log_dir, floors=floors):
        if report.recorded:
            click.echo(f"partition {report.partition}: stopped: {report.recorded}")
        for damage in report.damages:
            damaged = True
            known = rebuild(report.partition, damage.offset_start, damage.offset_end)
            fate = (
                "the archive holds all of them: `clickagg log repair` rebuilds them"
                if known.num_rows == damage.lost_offsets
                else f"the archive holds {known.num_rows}: the rest are lost"
            )
            click.echo(f"{damage.describe()}: {damage.lost_offsets} offsets; {fate}")
        if report.recorded and not report.damages:
            damaged = True
    if not damaged:
        click.echo("log ok: every frame of every partition reads back")
    sys.exit(1 if damaged else 0)


@log_group.command(name="repair")
@_settings_options
def log_repair(config_file: Path | None, print_config: bool, **flags: object) -> None:
    """Repair the log of a stopped server: quarantine damaged bytes, rebuild what the
    archive holds, mark the rest lost (named here), and let the partitions take events."""
    from clickagg.log.repair import repair_log

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    floors, rebuild = _log_tools(settings)
    try:
        done = repair_log(settings.log_dir, rebuild=rebuild, floors=floors)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    for repaired in done:
        click.echo(repaired.describe())
        if not repaired.rebuilt:
            for event_id in repaired.event_ids:
                click.echo(f"  lost: {event_id}")
    lost = sum(r.damage.lost_offsets for r in done if not r.rebuilt)
    click.echo(
        f"repaired {len(done)} damaged ranges; {lost} acknowledged events lost"
        if done
        else "nothing to repair"
    )


def _utc_ms(text: str, what: str) -> int:
    """An ISO-8601 time (UTC unless it says otherwise; ``2025-01-15T10`` is an hour)."""
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text + (":00" if len(text) == 13 else ""))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an ISO-8601 time", param_hint=what) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@main.command()
@_settings_options
@click.option("--hour", "hour", help="One UTC hour, e.g. 2025-01-15T10.")
@click.option("--day", "day", help="Every hour of one UTC day, e.g. 2025-01-15.")
@click.option("--since", "since", help="Every hour from this time on ...")
@click.option("--until", "until", help="... up to this time (default: now).")
@click.option(
    "--engine",
    type=click.Choice(["duckdb", "spark"]),
    default="duckdb",
    show_default=True,
    help="Batch engine that reads the archive (spark: the spark extra and Java 17+).",
)
@click.option(
    "--spark-master",
    envvar="CLICKAGG_SPARK_MASTER",
    metavar="URL",
    help="Run the spark engine on this cluster (e.g. spark://host:7077) instead of local "
    "mode; its executors must see the data dir at the same path.",
)
@click.option(
    "--spark-conf",
    "spark_conf",
    multiple=True,
    metavar="KEY=VALUE",
    help="A Spark setting for the spark engine, e.g. spark.driver.memory=8g (repeatable).",
)
@click.option("--reason", default="reconciled", show_default=True, help="Kept with a new version.")
@click.option(
    "--report",
    is_flag=True,
    help="Then show, per ad and hour, stream vs batch and the cause of each difference.",
)
def reconcile(
    config_file: Path | None,
    print_config: bool,
    hour: str | None,
    day: str | None,
    since: str | None,
    until: str | None,
    engine: str,
    spark_master: str | None,
    spark_conf: tuple[str, ...],
    reason: str,
    report: bool,
    **flags: object,
) -> None:
    """Compute final, billing-grade hours from the archive: exact dedup over the month,
    late events counted, a new version published only where the numbers changed. Safe
    beside a running server, and to run again."""
    from clickagg.batch.reconcile import EngineError
    from clickagg.batch.runner import reconcile_hours
    from clickagg.core.windows import DAY_MS, HOUR_MS

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    if sum(x is not None for x in (hour, day, since)) != 1:
        raise click.UsageError("give exactly one of --hour, --day, --since")
    if (spark_master or spark_conf) and engine != "spark":
        raise click.UsageError("--spark-master and --spark-conf apply to --engine spark")
    extra_conf = {}
    for item in spark_conf:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--spark-conf")
        extra_conf[key.strip()] = value
    if hour is not None:
        start = _utc_ms(hour, "--hour")
        end = start + HOUR_MS
    elif day is not None:
        start = _utc_ms(day, "--day")
        end = start + DAY_MS
    else:
        assert since is not None
        start = _utc_ms(since, "--since")
        end = _utc_ms(until, "--until") if until else int(time.time() * 1000)
    start -= start % HOUR_MS
    hours = list(range(start, end, HOUR_MS))
    if not hours:
        raise click.UsageError("the period holds no hour")
    try:
        runs = _with_progress(
            lambda report: reconcile_hours(
                settings,
                hours,
                reason=reason,
                engine=engine,
                spark_master=spark_master or None,
                spark_conf=extra_conf,
                progress=report,
            ),
            total=len(hours),
        )
    except EngineError as e:
        raise click.ClickException(str(e)) from e
    table = Table(title=f"reconciled {len(runs)} hours ({engine})")
    for column in ("hour", "clicks", "impressions", "spend", "late counted", "invalid", "version"):
        table.add_column(column, justify="left" if column == "hour" else "right")
    for run in runs:
        version = f"v{run.published.version} (new)" if run.published else "unchanged"
        table.add_row(
            _iso_hour(run.hour_ms),
            f"{run.clicks:,}",
            f"{run.impressions:,}",
            f"{run.spend_micros / 1e6:,.2f}",
            f"{run.late_counted:,}",
            f"{run.invalid:,}",
            version,
        )
    Console().print(table)
    if report:
        _print_report(settings, hours)


def _with_progress(
    run: Callable[[Callable[[Any], None]], _R], *, total: int, label: str = "reconcile"
) -> _R:
    """A progress bar (hours, archive files, events, rate, ETA) on a terminal; a log line
    per hour on stderr otherwise."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    if not err.is_terminal:
        done = {"reconcile": "reconciled", "replay": "replayed"}.get(label, label)

        def log_line(p: Any) -> None:
            click.echo(
                f"{done} {p.hours_done}/{p.hours} hours, {p.files} files, "
                f"{p.events:,} events, {p.rate:,.0f} events/s, ETA {p.eta_s:.0f} s",
                err=True,
            )

        return run(log_line)
    with Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} hours {task.fields[detail]}"),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(label, total=total, detail="")

        def update(p: Any) -> None:
            detail = f"· {p.files} files · {p.events:,} events · {p.rate:,.0f}/s"
            bar.update(task, completed=p.hours_done, detail=detail)

        return run(update)


def _print_report(settings: Settings, hours: list[int]) -> None:
    """Per (ad, hour) where the stream and the batch differ: both numbers and the causes."""
    from clickagg.batch.published import FinalRowsReader

    reader = FinalRowsReader(settings.batch_dir)
    rows = reader.reconciliation(start_ms=hours[0], end_ms=hours[-1] + 1)
    differing = [
        r
        for r in rows
        if (r.batch_clicks, r.batch_impressions, r.batch_spend_micros)
        != (r.stream_clicks, r.stream_impressions, r.stream_spend_micros)
    ]
    table = Table(title=f"stream vs batch: {len(differing)} of {len(rows)} (ad, hour) differ")
    for column in ("hour", "ad", "stream clicks", "batch clicks", "spend diff", "why"):
        table.add_column(column, justify="left" if column in ("hour", "ad", "why") else "right")
    for r in differing:
        causes = [
            f"{n:+,} {what}"
            for n, what in (
                (r.late_clicks, "late clicks counted"),
                (-r.beyond_horizon_clicks, "copies beyond the dedup horizon"),
                (-r.newly_invalid_clicks, "found invalid"),
            )
            if n
        ]
        table.add_row(
            _iso_hour(r.hour_ms),
            r.ad_id,
            f"{r.stream_clicks:,}",
            f"{r.batch_clicks:,}",
            f"{(r.batch_spend_micros - r.stream_spend_micros) / 1e6:+,.2f}",
            "; ".join(causes) or "impressions only",
        )
    Console().print(table)
    reviews = [r for r in rows if r.review_clicks]
    if reviews:
        flagged = Table(title=f"billable clicks flagged for review: {len(reviews)} (ad, hour)")
        for column in ("hour", "ad", "batch clicks", "for review"):
            flagged.add_column(column, justify="left" if column in ("hour", "ad") else "right")
        for r in reviews:
            flagged.add_row(
                _iso_hour(r.hour_ms), r.ad_id, f"{r.batch_clicks:,}", f"{r.review_clicks:,}"
            )
        Console().print(flagged)


@main.group(name="rules")
def rules_group() -> None:
    """Invalid-traffic rules."""


@rules_group.command(name="replay")
@_settings_options
@click.option(
    "--rules",
    "candidate_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The candidate rules file (TOML, as rules_file).",
)
@click.option("--since", "since", required=True, help="Every hour from this time on ...")
@click.option("--until", "until", help="... up to this time (default: now, floored to the hour).")
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Flipped clicks listed (the total is always given).",
)
@click.option(
    "--engine",
    type=click.Choice(["duckdb", "spark"]),
    default="duckdb",
    show_default=True,
    help="Batch engine that reads the archive.",
)
def rules_replay(
    config_file: Path | None,
    print_config: bool,
    candidate_file: Path,
    since: str,
    until: str | None,
    output: str,
    limit: int,
    engine: str,
    **flags: object,
) -> None:
    """What candidate rules would change: over the archive's hours, per ad and advertiser
    the billable clicks and spend now (as reconciled) and under the candidate, and the
    clicks whose verdict flips. Changes nothing."""
    from clickagg.batch.reconcile import EngineError
    from clickagg.batch.replay import replay_rules, report_json
    from clickagg.core.rules import RuleError
    from clickagg.core.rules.loading import load_rules
    from clickagg.core.windows import HOUR_MS

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    try:
        candidate = load_rules(candidate_file, blocklist=settings.blocklist_path)
    except RuleError as exc:
        raise SettingsUsageError(f"--rules: {exc}") from None
    start = _utc_ms(since, "--since")
    if until:
        end = _utc_ms(until, "--until")
    else:
        now = int(time.time() * 1000)
        end = now - now % HOUR_MS
    start -= start % HOUR_MS
    if end <= start:
        raise click.UsageError("the period holds no hour (--until must be after --since)")
    hours = len(range(start, end, HOUR_MS))
    try:
        report = _with_progress(
            lambda progress: replay_rules(
                settings, candidate, start, end, limit=limit, engine=engine, progress=progress
            ),
            total=hours,
            label="replay",
        )
    except EngineError as e:
        raise click.ClickException(str(e)) from e
    if output == "json":
        from clickagg.api.timefmt import iso

        click.echo(json.dumps(report_json(report, iso), indent=2))
        return
    _print_replay(report)


def _print_replay(report: Any) -> None:
    """Ads and advertisers whose numbers change, the totals, and the first flipped clicks."""
    console = Console()
    period = f"{_iso_hour(report.start_ms)} to {_iso_hour(report.end_ms)}"
    console.print(
        f"replayed {report.hours} hours ({period}), {report.events:,} events; "
        f"candidate {report.candidate.source}: {', '.join(report.candidate.ids) or 'no rules'}"
    )

    def changes(title: str, rows: list[tuple[str, Any]], of: int) -> None:
        table = Table(title=f"{title}: {len(rows)} of {of} change")
        for column in ("", "clicks now", "candidate", "delta", "spend now", "candidate", "delta"):
            table.add_column(column, justify="left" if not column else "right")
        for name, c in rows:
            table.add_row(
                name,
                f"{c.now_clicks:,}",
                f"{c.candidate_clicks:,}",
                f"{c.delta_clicks:+,}",
                f"{c.now_spend_micros / 1e6:,.2f}",
                f"{c.candidate_spend_micros / 1e6:,.2f}",
                f"{c.delta_spend_micros / 1e6:+,.2f}",
            )
        console.print(table)

    ads = [(f"{a.ad_id} ({a.advertiser_id or '-'})", a) for a in report.ads if a.changed]
    changes("ads", ads, len(report.ads))
    advertisers = [(a.advertiser_id or "(none)", a) for a in report.advertisers if a.changed]
    changes("advertisers", [*advertisers, ("total", report.total)], len(report.advertisers))
    flips = Table(title=f"flipped clicks: {len(report.flipped)} shown of {report.flipped_total}")
    for column in ("event", "ad", "time", "ip", "user agent", "now", "candidate"):
        flips.add_column(column, overflow="fold")
    for f in report.flipped:
        flips.add_row(
            f.event_id,
            f.ad_id,
            _iso_ms(f.ts_ms),
            f.ip or "",
            (f.user_agent or "")[:60],
            f.now_reason or "billable",
            f.candidate_reason or "billable",
        )
    console.print(flips)


def _iso_hour(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:00Z")


@main.command()
@_settings_options
@click.option("--advertiser", "advertiser_id", required=True, help="The advertiser's id.")
@click.option("--month", required=True, help="YYYY-MM, in the advertiser's time zone.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet"]),
    default="table",
    show_default=True,
)
@click.option("--output", type=click.Path(path_type=Path), help="Write here (parquet needs it).")
def statement(
    config_file: Path | None,
    print_config: bool,
    advertiser_id: str,
    month: str,
    fmt: str,
    output: Path | None,
    **flags: object,
) -> None:
    """An advertiser's monthly statement from final (reconciled) hours: per ad and day in
    the advertiser's time zone, billable clicks, spend, invalid clicks removed, and the
    adjustments restatements made after the month closed."""
    from clickagg.batch.published import FinalRowsReader
    from clickagg.batch.statement import build_statement, statement_frame, statement_json
    from clickagg.registry import AdRegistry, AdvertiserRegistry

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    registry = AdvertiserRegistry.for_data_dir(settings.data_dir, settings.advertisers_file)
    advertiser = registry.get(advertiser_id)
    ads = AdRegistry.for_data_dir(settings.data_dir, settings.ads_file)
    try:
        result = build_statement(
            FinalRowsReader(settings.batch_dir), advertiser, month, ads=ads.entries
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet needs --output")
    if fmt == "json":
        text = json.dumps(statement_json(result), indent=2)
    elif fmt == "csv":
        text = statement_frame(result).write_csv()
    elif fmt == "parquet":
        assert output is not None
        statement_frame(result).write_parquet(output)
        click.echo(f"wrote {len(result.lines)} lines to {output}")
        return
    else:
        pending = len(result.hours_not_final)
        table = Table(
            title=f"{advertiser.name} ({advertiser.advertiser_id}), {month}, "
            f"{advertiser.time_zone}, {advertiser.currency}"
            + (f" — {pending} hours not final yet" if pending else "")
        )
        for column in ("ad", "status", "day", "clicks", "impressions", "spend", "invalid removed"):
            table.add_column(
                column, justify="left" if column in ("ad", "status", "day") else "right"
            )
        for line in result.lines:
            table.add_row(
                line.ad_id,
                result.ad_status.get(line.ad_id, ""),
                line.day.isoformat(),
                f"{line.clicks:,}",
                f"{line.impressions:,}",
                f"{line.spend_micros / 1e6:,.2f}",
                f"{line.invalid_clicks:,}",
            )
        totals = result.totals
        table.add_row(
            "total",
            "",
            "",
            f"{totals['clicks']:,}",
            f"{totals['impressions']:,}",
            f"{totals['spend_micros'] / 1e6:,.2f}",
            f"{totals['invalid_clicks']:,}",
        )
        for ad_id, sums in sorted(result.adjustments_after_close.items()):
            table.add_row(
                ad_id,
                "",
                "adjusted later",
                f"{sums['clicks']:+,}",
                f"{sums['impressions']:+,}",
                f"{sums['spend_micros'] / 1e6:+,.2f}",
                f"{sums['invalid_clicks']:+,}",
            )
        Console().print(table)
        return
    if output is not None:
        output.write_text(text)
    else:
        click.echo(text)


@main.group()
def ads() -> None:
    """The ad registry: each ad's price, advertiser, campaign and status, versioned by
    effective time (set, import and list them)."""


def _when(text: str | None) -> int:
    now = int(time.time() * 1000)
    return now if text is None else _utc_ms(text, "--effective-from")


def _who() -> str:
    return os.environ.get("USER", "cli")


@ads.command(name="set")
@_settings_options
@click.argument("ad_id")
@click.option("--cpc-micros", type=click.IntRange(min=0), help="Price of a click, in micros.")
@click.option("--advertiser", "advertiser_id", help="The advertiser who owns the ad.")
@click.option("--campaign", "campaign_id", help="The campaign the ad runs in.")
@click.option(
    "--status",
    type=click.Choice(["active", "paused", "archived"]),
    help="Reported in listings and statements; clicks are counted whatever it is.",
)
@click.option("--effective-from", help="When it applies (event time; default: now).")
def ads_set(
    config_file: Path | None,
    print_config: bool,
    ad_id: str,
    cpc_micros: int | None,
    advertiser_id: str | None,
    campaign_id: str | None,
    status: str | None,
    effective_from: str | None,
    **flags: object,
) -> None:
    """Change an ad from now (or a later time) on: clicks before keep their price.
    A running server applies it without a restart."""
    from clickagg.core.ads import AdChangeError, change_of
    from clickagg.registry import AdRegistry, RegistryError

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    registry = AdRegistry.for_data_dir(settings.data_dir, settings.ads_file)
    since = _when(effective_from)
    fields = {
        "cpc_micros": cpc_micros,
        "advertiser_id": advertiser_id,
        "campaign_id": campaign_id,
        "status": status,
    }
    try:
        change = change_of(ad_id, since, fields)
        registry.record_changes([change], by=_who(), now_ms=int(time.time() * 1000))
    except (RegistryError, AdChangeError) as exc:
        raise click.ClickException(str(exc)) from None
    said = ", ".join(
        f"{cpc_micros} micros per click" if k == "cpc_micros" else f"{k} {v}"
        for k, v in change.fields().items()
    )
    click.echo(f"{ad_id}: {said} from {_iso_ms(since)}")


@ads.command(name="import")
@_settings_options
@click.argument("csv_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--effective-from", help="When the changes apply (event time; default: now).")
def ads_import(
    config_file: Path | None,
    print_config: bool,
    csv_file: Path,
    effective_from: str | None,
    **flags: object,
) -> None:
    """Change many ads at once from a CSV: ad_id and any of cpc_micros, advertiser_id,
    campaign_id, status (an empty cell leaves that field as it is)."""
    from clickagg.registry import AdRegistry, RegistryError, load_ad_changes

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    since = _when(effective_from)
    try:
        changes = load_ad_changes(csv_file, since)
        registry = AdRegistry.for_data_dir(settings.data_dir, settings.ads_file)
        registry.record_changes(changes, by=_who(), now_ms=int(time.time() * 1000))
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    prices = sum(1 for c in changes if c.cpc_micros is not None)
    click.echo(f"imported {len(changes)} ads ({prices} prices) effective from {_iso_ms(since)}")


@ads.command(name="list")
@_settings_options
@click.option("--at", "at", help="The registry as of this time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def ads_list(
    config_file: Path | None, print_config: bool, at: str | None, as_json: bool, **flags: object
) -> None:
    """Every ad as the registry describes it at a time: price, owner, status, and since
    when."""
    from clickagg.registry import AdRegistry

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    moment = _when(at)
    entries = AdRegistry.for_data_dir(settings.data_dir, settings.ads_file).entries(moment)
    if as_json:
        for entry in entries.values():
            click.echo(json.dumps(entry.as_json()))
        return
    table = Table(title=f"ads at {_iso_ms(moment)}")
    for column in ("ad", "cpc (micros)", "advertiser", "campaign", "status", "since"):
        table.add_column(column, justify="right" if column.startswith("cpc") else "left")
    for entry in entries.values():
        table.add_row(
            entry.ad_id,
            "" if entry.cpc_micros is None else f"{entry.cpc_micros:,}",
            entry.advertiser_id or "",
            entry.campaign_id or "",
            entry.status,
            _iso_ms(entry.since_ms),
        )
    Console().print(table)


@main.group()
def advertisers() -> None:
    """Advertisers: the name, currency and time zone their statements are made in."""


@advertisers.command(name="set")
@_settings_options
@click.argument("advertiser_id")
@click.option("--name", help="Shown on statements.")
@click.option("--currency", help="ISO 4217 code, e.g. EUR.")
@click.option("--time-zone", help="IANA time zone, e.g. Europe/Paris: statement days.")
def advertisers_set(
    config_file: Path | None,
    print_config: bool,
    advertiser_id: str,
    name: str | None,
    currency: str | None,
    time_zone: str | None,
    **flags: object,
) -> None:
    """Describe an advertiser (a field not given keeps its value); recorded with who and
    when, over the advertisers_file CSV."""
    from clickagg.registry import AdvertiserRegistry, RegistryError

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    registry = AdvertiserRegistry.for_data_dir(settings.data_dir, settings.advertisers_file)
    fields = {"name": name, "currency": currency, "time_zone": time_zone}
    try:
        advertiser = registry.record(
            advertiser_id, fields, by=_who(), now_ms=int(time.time() * 1000)
        )
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{advertiser.advertiser_id}: {advertiser.name}, {advertiser.currency}, "
        f"{advertiser.time_zone}"
    )


@advertisers.command(name="list")
@_settings_options
def advertisers_list(config_file: Path | None, print_config: bool, **flags: object) -> None:
    """Every advertiser as statements are made for them now."""
    from clickagg.registry import AdvertiserRegistry

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    registry = AdvertiserRegistry.for_data_dir(settings.data_dir, settings.advertisers_file)
    table = Table(title="advertisers")
    for column in ("advertiser", "name", "currency", "time zone"):
        table.add_column(column)
    for a in registry.current().values():
        table.add_row(a.advertiser_id, a.name, a.currency, a.time_zone)
    Console().print(table)


@main.group()
def blocklist() -> None:
    """The managed IP blocklist: addresses and CIDRs whose clicks are invalid from when
    they are added until they are removed (applied by rules with managed = true, such as
    the built-in ip-blocklist)."""


@blocklist.command(name="add")
@_settings_options
@click.argument("cidrs", nargs=-1, required=True)
@click.option("--reason", default="", help="Why: recorded with the entry.")
def blocklist_add(
    config_file: Path | None,
    print_config: bool,
    cidrs: tuple[str, ...],
    reason: str,
    **flags: object,
) -> None:
    """List addresses or CIDRs (IPv4 or IPv6). A running server applies them to the
    events it processes from its next rules check on (about a second)."""
    from clickagg.blocklist import Blocklist, BlocklistError

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    try:
        added = Blocklist(settings.blocklist_path).add(
            cidrs, reason=reason, by=_who(), now_ms=int(time.time() * 1000)
        )
    except BlocklistError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {', '.join(added) or 'nothing (already listed)'}")


@blocklist.command(name="remove")
@_settings_options
@click.argument("cidr")
@click.option("--reason", default="", help="Why: recorded with the removal.")
def blocklist_remove(
    config_file: Path | None, print_config: bool, cidr: str, reason: str, **flags: object
) -> None:
    """Take an entry off the list; the clicks it flagged while listed stay invalid."""
    from clickagg.blocklist import Blocklist, BlocklistError

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    try:
        removed = Blocklist(settings.blocklist_path).remove(
            cidr, by=_who(), now_ms=int(time.time() * 1000), reason=reason
        )
    except (BlocklistError, LookupError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {removed}")


@blocklist.command(name="list")
@_settings_options
def blocklist_list(config_file: Path | None, print_config: bool, **flags: object) -> None:
    """The entries listed now: since when, by whom and why."""
    from clickagg.blocklist import Blocklist

    settings = _resolve_settings(config_file, print_config, flags)
    if settings is None:
        return
    table = Table(title="IP blocklist")
    for column in ("cidr", "since", "by", "reason"):
        table.add_column(column)
    for entry in Blocklist(settings.blocklist_path).listed():
        table.add_row(entry.cidr, _iso_ms(entry.since_ms), entry.by, entry.reason)
    Console().print(table)


def _iso_ms(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")
