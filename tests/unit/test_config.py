"""Configuration: validated once, errors name the key and the file; Kudu settings precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from webjobsd.cli import _overrides, _parser, main
from webjobsd.config import AppSettings, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "webjobsd.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None, {"site": "/srv/site"})
    assert config.site == Path("/srv/site")
    assert config.debounce_s == 1.0
    assert config.debounce_cap_s == 30.0


def test_values_from_yaml_and_flags_on_top(tmp_path: Path) -> None:
    path = write(tmp_path, "site: /a\ndebounce_s: 2\nsettings:\n  WEBJOBS_RESTART_TIME: 5\n")
    config = load_config(path, {"site": "/b"})
    assert config.site == Path("/b")
    assert config.debounce_s == 2.0
    assert config.settings == {"WEBJOBS_RESTART_TIME": "5"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("debounse_s: 1\n", "unknown key 'debounse_s'"),
        ("debounce_s: fast\n", "key 'debounce_s' must be float, got str"),
        ("log_max_bytes: 1.5\n", "key 'log_max_bytes' must be int, got float"),
        ("log_max_bytes: true\n", "key 'log_max_bytes' must be int, got bool"),
        ("rescan_s: 0\n", "key 'rescan_s' must be greater than 0"),
        ("watch: fanotify\n", "key 'watch' must be one of inotify, poll, got 'fanotify'"),
        ("watch: 1\n", "key 'watch' must be str, got int"),
        ("poll_interval_s: 0\n", "key 'poll_interval_s' must be greater than 0"),
        ("poll_interval_s: -1.5\n", "key 'poll_interval_s' must be greater than 0"),
        ("poll_interval_s: often\n", "key 'poll_interval_s' must be float, got str"),
        ("log_format: xml\n", "key 'log_format' must be one of"),
        ("settings:\n  A: [1]\n", "key 'settings.A' must be a string or a number"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "site: /srv\n")
    assert main(["check-config", "--config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: blue\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err


def test_watch_mode_from_yaml_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`watch` and `poll_interval_s` default to inotify and 1 s; `--watch` and `--poll-interval`
    override the file; a bad flag value is refused naming the key."""
    defaults = load_config(None, {})
    assert (defaults.watch, defaults.poll_interval_s, defaults.scan_period_s) == (
        "inotify",
        1.0,
        30.0,
    )
    path = write(tmp_path, "watch: poll\npoll_interval_s: 2\n")
    from_file = load_config(path, {})
    assert (from_file.watch, from_file.poll_interval_s, from_file.scan_period_s) == (
        "poll",
        2.0,
        2.0,
    )
    flags = _parser().parse_args(["serve", "--watch", "inotify", "--poll-interval", "0.5"])
    overridden = load_config(path, _overrides(flags))
    assert (overridden.watch, overridden.poll_interval_s) == ("inotify", 0.5)
    assert main(["check-config", "--config", str(path), "--poll-interval", "0"]) == 2
    assert "key 'poll_interval_s' must be greater than 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check-config", "--watch", "fanotify"])
    assert "--watch: invalid choice: 'fanotify'" in capsys.readouterr().err


def test_app_settings_precedence(tmp_path: Path) -> None:
    store = tmp_path / "settings.json"
    settings = AppSettings(
        environ={"WEBJOBS_RESTART_TIME": "7", "APPSETTING_WEBJOBS_IDLE_TIMEOUT": "9"},
        config_settings={"WEBJOBS_RESTART_TIME": "3", "WEBJOBS_HISTORY_SIZE": "4"},
        store_path=store,
    )
    assert settings.seconds("WEBJOBS_RESTART_TIME", 60) == 7
    assert settings.seconds("WEBJOBS_IDLE_TIMEOUT", 120) == 9
    assert settings.seconds("WEBJOBS_HISTORY_SIZE", 50) == 4
    store.write_text('{"WEBJOBS_RESTART_TIME": "11", "WEBJOBS_HISTORY_SIZE": ""}')
    assert settings.seconds("WEBJOBS_RESTART_TIME", 60) == 11
    assert settings.seconds("WEBJOBS_HISTORY_SIZE", 50) == 4  # empty falls through


@pytest.mark.parametrize(
    ("value", "expected"), [("5", 5), ("-3", 0), ("junk", 60), (" 8 ", 8), ("", 60)]
)
def test_kudu_seconds_parsing(value: str, expected: int) -> None:
    settings = AppSettings(
        environ={"WEBJOBS_RESTART_TIME": value}, config_settings={}, store_path=None
    )
    assert settings.restart_time_s == expected


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("TRUE", True), ("yes", False)])
def test_kudu_true_like(value: str, expected: bool) -> None:
    settings = AppSettings(environ={"WEBJOBS_STOPPED": value}, config_settings={}, store_path=None)
    assert settings.jobs_stopped is expected
