"""settings.job: Newtonsoft-like lenient syntax and Kudu's type-checked getters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from webjobsd.discovery.jobsettings import (
    MAX_SETTINGS_BYTES,
    JobSettingsError,
    load_job_settings,
    parse_job_settings,
)
from webjobsd.model import JobKind, JobSettings

# --- syntax ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", {}, id="empty"),
        pytest.param(" \n\t ", {}, id="whitespace"),
        pytest.param("// nothing\n/* at all */", {}, id="comments-only"),
        pytest.param("\ufeff", {}, id="bom-only"),
        pytest.param('\ufeff{"a": 1}', {"a": 1}, id="bom"),
        pytest.param('{"a": 1} // tail', {"a": 1}, id="line-comment-at-end-without-newline"),
        pytest.param('{\n  // why\n  "a": 1 // more\n}', {"a": 1}, id="line-comments"),
        pytest.param('{/* x */"a"/* y */:/* z */1/**/}', {"a": 1}, id="block-comments"),
        pytest.param('{"a": 1, /* multi\n line */ "b": 2}', {"a": 1, "b": 2}, id="multiline"),
        pytest.param("{'a': 'x'}", {"a": "x"}, id="single-quotes"),
        pytest.param("""{'a': 'say "hi"'}""", {"a": 'say "hi"'}, id="double-in-single"),
        pytest.param(r"{'a': 'it\'s'}", {"a": "it's"}, id="escaped-single-quote"),
        pytest.param(r'{"a": "it\'s"}', {"a": "it's"}, id="escaped-single-in-double"),
        pytest.param(r"{'a': 'tab\there\u00e9\\'}", {"a": "tab\there\u00e9\\"}, id="escapes-kept"),
        pytest.param('{"a": "x // y"}', {"a": "x // y"}, id="line-marker-in-string"),
        pytest.param("{'a': '/* no */'}", {"a": "/* no */"}, id="block-marker-in-string"),
        pytest.param('{"a": "q\\"//"}', {"a": 'q"//'}, id="escaped-quote-then-marker"),
        pytest.param('{"a": [1, 2,],}', {"a": [1, 2]}, id="trailing-commas"),
        pytest.param('{"a": {"b": 1 , } , }', {"a": {"b": 1}}, id="trailing-commas-spaced"),
        pytest.param('{"a": 1, // c\n}', {"a": 1}, id="trailing-comma-then-comment"),
        pytest.param("{is_singleton: true, $x_1: 2}", {"is_singleton": True, "$x_1": 2}, id="bare"),
        pytest.param('{"a": "line\nbreak"}', {"a": "line\nbreak"}, id="raw-newline-in-string"),
        pytest.param('{"a": 1, "a": 2}', {"a": 2}, id="duplicate-last-wins"),
        pytest.param('{"a": -1.5e3, "b": null}', {"a": -1500.0, "b": None}, id="numbers-null"),
        pytest.param('{"é": "àéè"}', {"é": "àéè"}, id="non-ascii"),
    ],
)
def test_lenient_syntax(text: str, expected: dict[str, Any]) -> None:
    settings, warnings = parse_job_settings(text)
    assert dict(settings.raw) == expected
    assert warnings == []


@pytest.mark.parametrize(
    ("text", "line", "column", "reason"),
    [
        pytest.param('{"a": 1', 1, 8, "Expecting ',' delimiter", id="unclosed-object"),
        pytest.param('{\n  "a": 1\n  "b": 2\n}', 3, 3, "Expecting ',' delimiter", id="no-comma"),
        pytest.param('{\n  "a": 1,,\n}', 2, 10, "Expecting property name", id="double-comma"),
        pytest.param("{,}", 1, 2, "Expecting property name", id="lone-comma"),
        pytest.param("[,]", 1, 2, "Expecting value", id="lone-comma-array"),
        pytest.param('{"a": }', 1, 7, "Expecting value", id="missing-value"),
        pytest.param('{"a": 1},', 1, 9, "Extra data", id="comma-after-top-level"),
        pytest.param('{"a": 1} {"b": 2}', 1, 10, "Extra data", id="two-objects"),
        pytest.param('{"a": "x\\q"}', 1, 9, "Invalid \\escape", id="bad-escape"),
        pytest.param("{'a': 'x\\q'}", 1, 7, "Invalid \\escape", id="bad-escape-single-quoted"),
        pytest.param("{'a", 1, 2, "unterminated string", id="unterminated-string"),
        pytest.param("{} /* open", 1, 4, "unterminated /* comment", id="unterminated-comment"),
        pytest.param('{"a": NaN}', 1, 7, "unexpected word 'NaN'", id="nan"),
        pytest.param('{"a": -Infinity}', 1, 7, "unsupported number", id="minus-infinity"),
        pytest.param('{"a": 0x1F}', 1, 7, "unsupported number", id="hex"),
        pytest.param('{"a": undefined}', 1, 7, "unexpected word", id="undefined"),
        pytest.param('{"a": 1 / 2}', 1, 9, "unexpected character '/'", id="slash"),
        pytest.param('{"a": #}', 1, 7, "unexpected character '#'", id="hash"),
        pytest.param('\ufeff{\n"a" 1}', 2, 5, "Expecting ':' delimiter", id="position-after-bom"),
        pytest.param("{\n  'k': 'v',\n  x\n}", 3, 3, "unexpected word 'x'", id="bare-value"),
    ],
)
def test_broken_json_is_rejected_with_position(
    text: str, line: int, column: int, reason: str
) -> None:
    with pytest.raises(JobSettingsError) as caught:
        parse_job_settings(text)
    error = caught.value
    assert (error.line, error.column) == (line, column)
    assert reason in error.reason
    assert str(error).startswith("settings.job: ")
    assert f"line {line}, column {column}" in str(error)


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("[]", "array"),
        ('"x"', "string"),
        ("1", "integer"),
        ("1.5", "number"),
        ("true", "boolean"),
        ("null", "null"),
    ],
)
def test_top_level_must_be_an_object(text: str, got: str) -> None:
    with pytest.raises(JobSettingsError, match=f"must be a JSON object, got {got}"):
        parse_job_settings(text)


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^settings\.job: "):
        parse_job_settings("[")


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(JobSettingsError, match="nested too deeply"):
        parse_job_settings('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")


# --- typing rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", JobSettings()),
        (
            '{"is_singleton": true, "stopping_wait_time": 60, "is_in_place": false,'
            ' "schedule": "0 */5 * * * *"}',
            JobSettings(
                is_singleton=True,
                stopping_wait_time_s=60.0,
                is_in_place=False,
                schedule="0 */5 * * * *",
            ),
        ),
        ('{"is_singleton": false}', JobSettings(is_singleton=False)),
        ('{"is_in_place": true}', JobSettings(is_in_place=True)),
        ('{"stopping_wait_time": 0}', JobSettings(stopping_wait_time_s=0.0)),
        ('{"schedule": ""}', JobSettings(schedule="")),
        ("{'stopping_wait_time': 2, /* c */}", JobSettings(stopping_wait_time_s=2.0)),
    ],
)
def test_well_typed_values_are_used(text: str, expected: JobSettings) -> None:
    settings, warnings = parse_job_settings(text)
    assert warnings == []
    assert settings.is_singleton == expected.is_singleton
    assert settings.stopping_wait_time_s == expected.stopping_wait_time_s
    assert settings.is_in_place == expected.is_in_place
    assert settings.schedule == expected.schedule


@pytest.mark.parametrize(
    ("key", "value", "expected", "got"),
    [
        ("is_singleton", '"true"', "boolean", "string"),
        ("is_singleton", "1", "boolean", "integer"),
        ("is_singleton", "null", "boolean", "null"),
        ("is_in_place", '"false"', "boolean", "string"),
        ("is_in_place", "0", "boolean", "integer"),
        ("stopping_wait_time", '"60"', "integer", "string"),
        ("stopping_wait_time", "true", "integer", "boolean"),
        ("stopping_wait_time", "60.0", "integer", "number"),
        ("stopping_wait_time", "1.5", "integer", "number"),
        ("stopping_wait_time", "[60]", "integer", "array"),
        ("schedule", "5", "string", "integer"),
        ("schedule", '{"cron": "x"}', "string", "object"),
    ],
)
def test_wrong_types_are_ignored_with_a_warning(
    key: str, value: str, expected: str, got: str
) -> None:
    settings, warnings = parse_job_settings(f'{{"{key}": {value}}}')
    assert warnings == [f'settings.job: "{key}" must be a JSON {expected}, got {got}; ignored']
    assert settings.is_singleton is False
    assert settings.stopping_wait_time_s is None
    assert settings.is_in_place is None
    assert settings.schedule is None
    assert key in settings.raw  # still round-tripped as written


def test_wrong_types_fall_back_to_kudu_defaults() -> None:
    settings, _ = parse_job_settings('{"stopping_wait_time": "60"}')
    assert settings.stopping_wait_s(JobKind.CONTINUOUS) == 5.0
    assert settings.stopping_wait_s(JobKind.TRIGGERED) == 30.0


def test_negative_wait_is_clamped_to_zero() -> None:
    settings, warnings = parse_job_settings('{"stopping_wait_time": -7}')
    assert settings.stopping_wait_time_s == 0.0
    assert warnings == ['settings.job: "stopping_wait_time" is negative (-7); using 0']


def test_wait_beyond_int64_is_ignored() -> None:
    settings, warnings = parse_job_settings('{"stopping_wait_time": 9223372036854775808}')
    assert settings.stopping_wait_time_s is None
    assert warnings == [
        'settings.job: "stopping_wait_time" is out of the 64-bit integer range; ignored'
    ]


def test_every_warning_is_reported() -> None:
    _, warnings = parse_job_settings('{"is_singleton": "yes", "schedule": 1, "is_in_place": 1}')
    assert len(warnings) == 3


def test_unknown_keys_are_kept_without_warnings() -> None:
    text = """{
        // a comment
        "is_singleton": true,
        "my_key": {"nested": [1, 'two']},
        run_mode: 'continuous',
    }"""
    settings, warnings = parse_job_settings(text)
    assert warnings == []
    assert type(settings.raw) is dict
    assert settings.raw == {
        "is_singleton": True,
        "my_key": {"nested": [1, "two"]},
        "run_mode": "continuous",
    }


# --- files ----------------------------------------------------------------------------------


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert load_job_settings(tmp_path / "settings.job") == (JobSettings(), [])
    assert load_job_settings(tmp_path / "nodir" / "settings.job") == (JobSettings(), [])


def test_dangling_link_counts_as_missing(tmp_path: Path) -> None:
    (tmp_path / "settings.job").symlink_to(tmp_path / "gone")
    assert load_job_settings(tmp_path / "settings.job") == (JobSettings(), [])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"is_singleton": true}', id="utf-8"),
        pytest.param(b'\xef\xbb\xbf{"is_singleton": true}', id="utf-8-bom"),
        pytest.param('\ufeff{"is_singleton": true}'.encode("utf-16-le"), id="utf-16-le-bom"),
        pytest.param('\ufeff{"is_singleton": true}'.encode("utf-16-be"), id="utf-16-be-bom"),
        pytest.param('\ufeff{"is_singleton": true}'.encode("utf-32-le"), id="utf-32-le-bom"),
        pytest.param(b"{'is_singleton': true, } // done", id="lenient"),
    ],
)
def test_load_decodes_like_dotnet(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "settings.job"
    path.write_bytes(data)
    settings, warnings = load_job_settings(path)
    assert settings.is_singleton is True
    assert warnings == []


def test_load_returns_warnings(tmp_path: Path) -> None:
    path = tmp_path / "settings.job"
    path.write_text('{"is_singleton": "true", "schedule": "0 0 * * * *"}', encoding="utf-8")
    settings, warnings = load_job_settings(path)
    assert settings.schedule == "0 0 * * * *"
    assert warnings == ['settings.job: "is_singleton" must be a JSON boolean, got string; ignored']


def test_undecodable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "settings.job"
    path.write_bytes(b'{"a": "caf\xe9"}')  # Latin-1, no BOM
    with pytest.raises(JobSettingsError, match="not valid UTF-8") as caught:
        load_job_settings(path)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "settings.job"
    path.mkdir()
    with pytest.raises(JobSettingsError, match="cannot read") as caught:
        load_job_settings(path)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO named settings.job (no writer ever comes) is an error at once, not a hang; a
    link to a regular file is still read."""
    fifo = tmp_path / "settings.job"
    os.mkfifo(fifo)
    with pytest.raises(JobSettingsError, match="a FIFO, not a file"):
        load_job_settings(fifo)
    shared = tmp_path / "shared.json"
    shared.write_text('{"is_singleton": true}')
    link = tmp_path / "linked" / "settings.job"
    link.parent.mkdir()
    link.symlink_to(shared)
    assert load_job_settings(link)[0].is_singleton is True
    link.unlink()
    link.symlink_to(fifo)
    with pytest.raises(JobSettingsError, match="a FIFO, not a file"):
        load_job_settings(link)


def test_parse_error_in_file_names_the_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "settings.job"
    path.write_text('{\n  "a": 1\n  "b": 2\n}', encoding="utf-8")
    with pytest.raises(JobSettingsError) as caught:
        load_job_settings(path)
    assert caught.value.path == path
    assert str(caught.value) == f"{path}: Expecting ',' delimiter at line 3, column 3"


def test_huge_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "settings.job"
    path.write_bytes(b"{}" + b" " * MAX_SETTINGS_BYTES)
    with pytest.raises(JobSettingsError, match="larger than"):
        load_job_settings(path)
