"""vsmtprelay at the edges of its input: numbers past 64 bits, 10 KB words, paths that are no map.

Each refusal must leave the directory of the database exactly as it was:
the file's bytes, and no file created beside it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import Run, makemap, makemap_entries

LONG = 10 * 1024
MAX_TICKS = "9223372036854775807"  # 2**63 - 1
MAX_MINUTES = "153722867280912930"  # (2**63 - 1) // 60


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "relayers.db"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


def shown(word: str) -> str:
    """How an overlong word is quoted in an error line."""
    return f"{word[:64]!r}... ({len(word)} characters)"


@pytest.mark.parametrize("existing", [True, False], ids=["existing", "absent"])
@pytest.mark.parametrize(
    "ticks",
    ["9223372036854775808", "9999999999999999999999999999", "1" + "0" * 30, "9" * LONG],
    ids=["2**63", "28-digits", "10**30", "10k-digits"],
)
def test_ticks_past_signed_64_bits_are_refused_and_nothing_written(
    vsmtprelay: Run, db: Path, ticks: str, existing: bool
) -> None:
    if existing:
        makemap("hash", str(db)[:-3], stdin="192.0.2.2\t5\n")
    before = snapshot(db.parent)
    result = vsmtprelay("--db", str(db), "add", "192.0.2.1", ticks)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"vsmtprelay: ticks must be a whole number from 0 to {MAX_TICKS}, not "
    )
    assert len(result.stderr.splitlines()) == 1
    assert snapshot(db.parent) == before
    assert db.exists() == existing


def test_the_largest_ticks_and_minutes_are_accepted(vsmtprelay: Run, db: Path) -> None:
    assert vsmtprelay("--db", str(db), "add", "192.0.2.1", MAX_TICKS).returncode == 0
    # Leading zeros do not count against the bound: the value does.
    assert vsmtprelay("--db", str(db), "add", "192.0.2.2", "000" + MAX_TICKS).returncode == 0
    assert makemap_entries(db) == {"192.0.2.1": MAX_TICKS, "192.0.2.2": MAX_TICKS}
    assert vsmtprelay("--db", str(db), "add", "192.0.2.3", "100").returncode == 0
    assert vsmtprelay("--db", str(db), "list", MAX_MINUTES).stdout == ""
    expired = vsmtprelay("--db", str(db), "expire", MAX_MINUTES)
    assert (expired.returncode, expired.stderr) == (0, "vsmtprelay: expired 0 entries\n")
    assert set(makemap_entries(db)) == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}


@pytest.mark.parametrize("command", ["list", "expire"])
@pytest.mark.parametrize(
    "minutes", [str(int(MAX_MINUTES) + 1), "9" * 30, "9" * LONG], ids=["max+1", "30-digits", "10k"]
)
def test_minutes_past_the_bound_are_refused_and_nothing_written(
    vsmtprelay: Run, db: Path, command: str, minutes: str
) -> None:
    makemap("hash", str(db)[:-3], stdin=f"192.0.2.2\t{int(time.time()) - 7200}\n")
    before = snapshot(db.parent)
    result = vsmtprelay("--db", str(db), command, minutes)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"vsmtprelay: n (minutes) must be a whole number from 0 to {MAX_MINUTES}, not "
    )
    assert len(result.stderr.splitlines()) == 1
    assert snapshot(db.parent) == before


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["add", "1" * LONG], "1" * LONG),
        (["add", "9" * LONG + ".1.1.1"], "9" * LONG + ".1.1.1"),
        (["add", "0" + "1" * LONG + ".1.1.1"], "0" + "1" * LONG + ".1.1.1"),
        (["add", "2001:db8::" + "1" * LONG], "2001:db8::" + "1" * LONG),
        (["add", "a" * LONG], "a" * LONG),
        (["add", "192.0.2.1", "x" * LONG], "x" * LONG),
        (["delete", "192.0.2.1", "b" * LONG], "b" * LONG),
        (["expire", "x" * LONG], "x" * LONG),
        (["list", "-" + "1" * LONG], "-" + "1" * LONG),
        (["c" * LONG], "c" * LONG),
        (["--" + "d" * LONG, "dump"], "--" + "d" * LONG),
    ],
    ids=[
        "digits",
        "huge-quad",
        "leading-zero-quad",
        "ipv6",
        "letters",
        "ticks",
        "delete",
        "expire",
        "list",
        "command",
        "option",
    ],
)
def test_an_overlong_argument_is_quoted_cut_short(
    vsmtprelay: Run, db: Path, args: list[str], word: str
) -> None:
    makemap("hash", str(db)[:-3], stdin="192.0.2.1\t5\n")
    before = snapshot(db.parent)
    result = vsmtprelay("--db", str(db), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("vsmtprelay: ")
    assert shown(word) in first
    assert len(first) < 250
    assert snapshot(db.parent) == before


def test_a_database_path_longer_than_any_file_is_refused(vsmtprelay: Run, tmp_path: Path) -> None:
    path = str(tmp_path / ("a" * LONG))
    result = vsmtprelay("--db", path, "add", "192.0.2.1")
    assert result.returncode == 2
    assert result.stderr == (
        f"vsmtprelay: the database path {shown(path)} is too long (at most 4095 bytes)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [["dump"], ["list"], ["list", "5"], ["add", "192.0.2.1"], ["delete", "192.0.2.1"], ["expire"]],
)
def test_a_directory_is_refused_naming_it_and_the_cause_once(
    vsmtprelay: Run, tmp_path: Path, args: list[str]
) -> None:
    directory = tmp_path / "relayers.db"
    directory.mkdir()
    result = vsmtprelay("--db", str(directory), *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"vsmtprelay: cannot open {directory}: Is a directory\n"
    assert [path.name for path in tmp_path.iterdir()] == ["relayers.db"]
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize("args", [["dump"], ["add", "192.0.2.1"]])
def test_a_fifo_is_refused_not_waited_on(vsmtprelay: Run, db: Path, args: list[str]) -> None:
    os.mkfifo(db)
    result = vsmtprelay("--db", str(db), *args)  # without the check: blocked in open()
    assert result.returncode == 1
    assert result.stderr == f"vsmtprelay: cannot open {db}: not a regular file\n"


@pytest.mark.parametrize("args", [["dump"], ["add", "192.0.2.1"]])
def test_a_file_that_is_no_hash_map_is_named_once(
    vsmtprelay: Run, db: Path, args: list[str]
) -> None:
    db.write_text("192.0.2.1 RELAY\n")
    before = snapshot(db.parent)
    result = vsmtprelay("--db", str(db), *args)
    assert result.returncode == 1
    assert result.stderr == (
        f"vsmtprelay: {db}: not a Berkeley DB hash file (unexpected file type or format)\n"
    )
    assert snapshot(db.parent) == before
