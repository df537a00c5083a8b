"""Settings from flags, CLICKAGG_* variables, a TOML file and the defaults; the README."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from clickagg.config import Settings
from clickagg.settings_loader import (
    SPECS,
    SettingsError,
    display_value,
    load_settings,
    parse_size,
)

README = Path(__file__).parent.parent / "README.md"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_nothing_given_is_the_settings_defaults() -> None:
    loaded = load_settings()
    assert loaded.settings == Settings()
    assert set(loaded.sources.values()) == {"default"}


def test_every_settings_field_is_a_setting() -> None:
    assert sorted(spec.field for spec in SPECS.values()) == sorted(
        field.name for field in dataclasses.fields(Settings)
    )
    for name, spec in SPECS.items():
        assert spec.env == "CLICKAGG_" + name.upper()


def test_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", 'partitions = 2\nallowed_lateness = "2m"\n')
    env = {"CLICKAGG_PARTITIONS": "3", "CLICKAGG_ALLOWED_LATENESS": "3m"}
    flags = {"partitions": 4, "allowed_lateness": 4 * 60_000}

    both = load_settings(flags=flags, environ=env, config_file=config)
    assert (both.settings.partitions, both.settings.allowed_lateness_ms) == (4, 240_000)
    assert both.sources["partitions"] == "flag --partitions"

    no_flag = load_settings(environ=env, config_file=config)
    assert (no_flag.settings.partitions, no_flag.settings.allowed_lateness_ms) == (3, 180_000)
    assert no_flag.sources["partitions"] == "env CLICKAGG_PARTITIONS"

    file_only = load_settings(config_file=config)
    assert (file_only.settings.partitions, file_only.settings.allowed_lateness_ms) == (2, 120_000)
    assert file_only.sources["allowed_lateness"] == f"file {config}"

    flags_unset = load_settings(flags=dict.fromkeys(flags), config_file=config)
    assert flags_unset.settings.partitions == 2
    assert load_settings().settings.partitions == Settings().partitions


def test_the_config_file_comes_from_the_flag_or_else_clickagg_config(tmp_path: Path) -> None:
    by_env = write(tmp_path / "env.toml", "partitions = 2\n")
    by_flag = write(tmp_path / "flag.toml", "partitions = 5\n")
    assert load_settings(environ={"CLICKAGG_CONFIG": str(by_env)}).settings.partitions == 2
    loaded = load_settings(environ={"CLICKAGG_CONFIG": str(by_env)}, config_file=by_flag)
    assert loaded.settings.partitions == 5


def test_values_in_every_syntax(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        "\n".join(
            [
                'data_dir = "/srv/clickagg"',
                'ads_file = "ads.csv"',
                "max_future = 90",  # a bare duration is seconds
                'snapshot_interval = "250ms"',
                'retention = "2d"',
                "max_body_bytes = 1048576",
                'segment_bytes = "8MiB"',
                "max_batch_events = 1_000",
                'log_level = "INFO"',
            ]
        ),
    )
    env = {"CLICKAGG_RETENTION_BYTES": "1GiB", "CLICKAGG_MICRO_BATCH_EVENTS": "7"}
    settings = load_settings(environ=env, config_file=config).settings
    assert settings.data_dir == Path("/srv/clickagg")
    assert settings.ads_file == Path("ads.csv")
    assert settings.max_future_ms == 90_000
    assert settings.snapshot_interval_ms == 250
    assert settings.retention_ms == 2 * 86_400_000
    assert settings.max_body_bytes == 1024**2
    assert settings.segment_bytes == 8 * 1024**2
    assert settings.max_batch_events == 1000
    assert settings.log_level == "info"
    assert settings.retention_bytes == 1024**3
    assert settings.micro_batch_events == 7
    assert load_settings(environ={"CLICKAGG_ADS_FILE": ""}).settings.ads_file is None


def test_sizes() -> None:
    assert parse_size("123") == 123
    assert parse_size("64MiB") == 64 * 1024**2
    assert parse_size(" 2 KiB ") == 2048
    with pytest.raises(ValueError, match="not a size"):
        parse_size("64MB")


def test_benchmark_variables_are_not_settings() -> None:
    assert load_settings(environ={"CLICKAGG_BENCH_SRC": "/tmp/x", "HOME": "/"}).settings == (
        Settings()
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("partitons = 2\n", r"c\.toml: unknown key 'partitons' \(did you mean partitions\?\)"),
        ("allowed_lateness_ms = 60000\n", r"c\.toml: unknown key 'allowed_lateness_ms'"),
        ('allowed_lateness = "soon"\n', r"c\.toml: allowed_lateness: not a duration: 'soon'"),
        ("partitions = true\n", r"c\.toml: partitions: expected an integer, got True"),
        ("partitions = -1\n", r"c\.toml: partitions: must not be negative"),
        ('segment_bytes = "lots"\n', r"c\.toml: segment_bytes: not a size: 'lots'"),
        ("log_level = 3\n", r"c\.toml: log_level: expected a string, got 3"),
        ('log_level = "loud"\n', r"c\.toml: log_level: 'loud' is not one of critical"),
        ("[server]\nport = 1\n", r"c\.toml: unknown key 'server'"),
        ("partitions = \n", r"c\.toml: not valid TOML"),
    ],
)
def test_file_errors_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    config = write(tmp_path / "c.toml", text)
    with pytest.raises(SettingsError, match=expected):
        load_settings(config_file=config)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"CLICKAGG_PARTITONS": "2"},
            r"environment variable CLICKAGG_PARTITONS: unknown setting "
            r"\(did you mean CLICKAGG_PARTITIONS\?\)",
        ),
        (
            {"CLICKAGG_PORT": "eighty"},
            r"environment variable CLICKAGG_PORT: not an integer: 'eighty'",
        ),
        (
            {"CLICKAGG_DEDUP_HORIZON": "1 hour"},
            r"environment variable CLICKAGG_DEDUP_HORIZON: not a duration",
        ),
        ({"CLICKAGG_DATA_DIR": ""}, r"environment variable CLICKAGG_DATA_DIR: must not be empty"),
        ({"CLICKAGG_CONFIG": "/nonexistent.toml"}, r"CLICKAGG_CONFIG: no such file"),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError, match=expected):
        load_settings(environ=env)


def test_inconsistent_settings_say_where_each_value_came_from(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", 'dedup_horizon = "10m"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"CLICKAGG_ALLOWED_LATENESS": "20m"}, config_file=config)
    message = str(caught.value)
    assert "dedup horizon must be at least allowed lateness + 1 minute" in message
    assert "allowed_lateness = 20m (env CLICKAGG_ALLOWED_LATENESS)" in message
    assert f"dedup_horizon = 10m (file {config})" in message


def test_printed_config_is_a_config_file_that_reads_back_the_same(tmp_path: Path) -> None:
    env = {"CLICKAGG_SEGMENT_BYTES": "1000", "CLICKAGG_ADS_FILE": "ads.csv"}
    loaded = load_settings(flags={"allowed_lateness": 1500}, environ=env)
    text = loaded.to_toml()
    assert re.search(r'^segment_bytes = "1000" +# env CLICKAGG_SEGMENT_BYTES$', text, re.M)
    assert re.search(r'^allowed_lateness = "1500ms" +# flag --allowed-lateness$', text, re.M)
    assert re.search(r"^partitions = 8 +# default$", text, re.M)
    assert set(tomllib.loads(text)) == set(SPECS)
    again = load_settings(config_file=write(tmp_path / "printed.toml", text))
    assert again.settings == loaded.settings
    assert load_settings(config_file=write(tmp_path / "defaults.toml", load_settings().to_toml()))


def _readme_settings_table() -> dict[str, dict[str, str]]:
    """The Configuration section's table: TOML key -> {column: cell without backticks}."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip().replace("`", "") for cell in line.strip("|").split("|")]
        row = dict(zip(header, cells, strict=True))
        rows[row["TOML key"]] = row
    return rows


def test_the_readme_documents_every_setting_and_its_default() -> None:
    rows = _readme_settings_table()
    assert set(rows) >= set(SPECS), f"settings missing from README.md: {set(SPECS) - set(rows)}"
    assert set(rows) <= set(SPECS), f"README.md documents no such setting: {set(rows) - set(SPECS)}"
    for name, spec in SPECS.items():
        row = rows[name]
        assert row["environment variable"] == spec.env, name
        assert row["flag"] == (spec.flag or "-"), name
        assert row["default"] == display_value(spec, spec.default), name
        assert row["meaning"], name


def test_print_config_says_the_admin_token_is_set_without_showing_it() -> None:
    loaded = load_settings(environ={"CLICKAGG_ADMIN_TOKEN": "ops:hunter2"})
    assert loaded.settings.admin_token == "ops:hunter2"
    text = loaded.to_toml()
    assert "hunter2" not in text
    assert 'admin_token = "(set, not shown)"' in text
    assert 'admin_token = ""' in load_settings(environ={}).to_toml()


def test_replica_hours_are_whole_hours_or_none() -> None:
    env = {"CLICKAGG_REPLICA_HOURS": "2h"}
    assert load_settings(environ=env).settings.replica_hours_ms == 2 * 3_600_000
    assert load_settings(environ={"CLICKAGG_REPLICA_HOURS": "0"}).settings.replica_hours_ms == 0
    with pytest.raises(ValueError, match="replica hours must be whole hours"):
        Settings(replica_hours_ms=90 * 60_000)
