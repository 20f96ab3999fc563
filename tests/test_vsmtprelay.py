"""vsmtprelay as an administrator uses it: the real command, real makemap, real files."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from relayproxy import __version__
from relayproxy.cli.vsmtprelay import _store_settings, main
from tests.conftest import DB_DUMP, DB_LOAD, Run, makemap, makemap_entries


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "relayers.db"


def test_add_list_and_dump(vsmtprelay: Run, db: Path) -> None:
    before = int(time.time())
    assert vsmtprelay("--db", str(db), "add", "192.0.2.10").returncode == 0
    assert vsmtprelay("--db", str(db), "add", "192.0.2.9", "100").returncode == 0
    assert vsmtprelay("--db", str(db), "add", "2001:db8::1", "99999999999").returncode == 0
    stamp = int(makemap_entries(db)["192.0.2.10"])
    assert before <= stamp <= int(time.time())
    listing = vsmtprelay("--db", str(db), "list")
    assert listing.returncode == 0
    # Sorted by address; the future-stamped entry is pinned, so list leaves it out.
    assert listing.stdout == f"192.0.2.9\t100\n192.0.2.10\t{stamp}\n"
    dump = vsmtprelay("--db", str(db), "dump")
    assert dump.stdout == (
        f"192.0.2.9\t100\n192.0.2.10\t{stamp}\nipv6:2001:db8:0:0:0:0:0:1\t99999999999\n"
    )


def test_list_and_expire_with_minutes(vsmtprelay: Run, db: Path) -> None:
    now = int(time.time())
    for address, age in (("192.0.2.1", 10), ("192.0.2.2", 600), ("192.0.2.3", 7200)):
        assert vsmtprelay("--db", str(db), "add", address, str(now - age)).returncode == 0
    assert vsmtprelay("--db", str(db), "add", "192.0.2.4", str(now + 3600)).returncode == 0
    older_than_5 = vsmtprelay("--db", str(db), "list", "5").stdout
    assert older_than_5 == f"192.0.2.2\t{now - 600}\n192.0.2.3\t{now - 7200}\n"
    expired = vsmtprelay("--db", str(db), "expire", "60")
    assert expired.returncode == 0
    assert expired.stdout == ""  # stdout stays data
    assert expired.stderr == "vsmtprelay: expired 1 entry\n"
    assert set(makemap_entries(db)) == {"192.0.2.1", "192.0.2.2", "192.0.2.4"}
    assert vsmtprelay("--db", str(db), "expire").stderr == "vsmtprelay: expired 2 entries\n"
    # The pinned (future) entry survives every expire.
    assert set(makemap_entries(db)) == {"192.0.2.4"}


def test_delete_reports_the_absent_and_still_deletes_the_rest(vsmtprelay: Run, db: Path) -> None:
    vsmtprelay("--db", str(db), "add", "192.0.2.1", "1")
    vsmtprelay("--db", str(db), "add", "192.0.2.2", "1")
    vsmtprelay("--db", str(db), "add", "2001:db8::5", "1")
    result = vsmtprelay("--db", str(db), "delete", "192.0.2.1", "198.51.100.1", "2001:db8::5")
    assert result.returncode == 1
    assert "198.51.100.1: not in" in result.stderr
    assert "192.0.2.1" not in result.stderr
    assert makemap_entries(db) == {"192.0.2.2": "1"}
    assert vsmtprelay("--db", str(db), "delete", "192.0.2.2").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "1.2.3"], "invalid address '1.2.3'"),
        (["add", "01.2.3.4"], "leading zero"),
        (["add", "256.0.0.1"], "larger than 255"),
        (["add", "mail.example.com"], "host names"),
        (["add", "1.2.3.4 "], "whitespace"),
        (["add", ""], "empty"),
        (["add", "1.2.3.4", "-5"], "not '-5'"),
        (["add", "1.2.3.4", "12x"], "not '12x'"),
        (["add", "1.2.3.4", "1", "2"], "add takes"),
        (["add"], "add takes"),
        (["delete"], "at least one"),
        (["delete", "192.0.2.2", "bogus"], "invalid address 'bogus'"),
        (["expire", "x"], "not 'x'"),
        (["expire", "1", "2"], "at most one"),
        (["list", "-1"], "not '-1'"),
        (["dump", "extra"], "no arguments"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_touch_nothing(
    vsmtprelay: Run, db: Path, args: list[str], message: str
) -> None:
    makemap("hash", str(db)[:-3], stdin="192.0.2.2\t5\n")
    before = db.read_bytes()
    result = vsmtprelay("--db", str(db), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert message in result.stderr
    assert db.read_bytes() == before


def test_a_nul_byte_in_an_address_is_refused(db: Path) -> None:
    # A NUL cannot cross exec(), so this one goes through main() directly.
    with pytest.raises(SystemExit) as exit_info:
        main(["--db", str(db), "add", "1.2.3.4\x00"])
    assert exit_info.value.code == 2
    assert not db.exists()


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["ADD", "1.2.3.4"]])
def test_no_or_unknown_command_prints_usage_and_exits_2(vsmtprelay: Run, args: list[str]) -> None:
    result = vsmtprelay(*args)
    assert result.returncode == 2
    assert f"vsmtprelay {__version__}" in result.stderr
    for line in ("add ip [ticks]", "delete ip [...]", "expire [n]", "list [n]", "dump"):
        assert line in result.stderr


def test_help_and_version(vsmtprelay: Run) -> None:
    helped = vsmtprelay("--help")
    assert helped.returncode == 0
    assert "--db PATH" in helped.stdout
    assert "add ip [ticks]" in helped.stdout
    version = vsmtprelay("--version")
    assert version.stdout == f"vsmtprelay {__version__}\n"


def test_missing_database_lists_empty_with_a_warning(vsmtprelay: Run, db: Path) -> None:
    for command in ("list", "dump"):
        result = vsmtprelay("--db", str(db), command)
        assert result.returncode == 0
        assert result.stdout == ""
        assert "does not exist" in result.stderr
    assert not db.exists()


def test_permission_denied_is_one_clear_line(vsmtprelay: Run, open_dir: Path) -> None:
    db = open_dir / "relayers.db"
    vsmtprelay("--db", str(db), "add", "192.0.2.1", "1")
    db.chmod(0o600)
    if os.geteuid() == 0:
        result = vsmtprelay("--db", str(db), "dump", user="65534")
    else:
        db.chmod(0)
        result = vsmtprelay("--db", str(db), "dump")
    assert result.returncode == 1
    assert result.stderr.strip() == f"vsmtprelay: cannot open {db}: Permission denied"
    assert "Traceback" not in result.stderr


def test_list_output_is_rebuilt_unchanged_by_makemap(vsmtprelay: Run, db: Path) -> None:
    for n in range(40):
        vsmtprelay("--db", str(db), "add", f"10.{n}.{n * 3}.{n * 5}", str(1_700_000_000 + n))
    vsmtprelay("--db", str(db), "add", "2001:db8::42", "1700000001")
    listing = vsmtprelay("--db", str(db), "list").stdout
    rebuilt = db.parent / "rebuilt"
    assert makemap("hash", str(rebuilt), stdin=listing).returncode == 0
    assert vsmtprelay("--db", f"{rebuilt}.db", "list").stdout == listing
    assert makemap_entries(Path(f"{rebuilt}.db")) == makemap_entries(db)


def test_a_map_made_by_makemap_is_read_and_updated(vsmtprelay: Run, db: Path) -> None:
    made = makemap("hash", str(db)[:-3], stdin="192.0.2.1\t10\n192.0.2.2\t20\n")
    assert made.returncode == 0
    assert vsmtprelay("--db", str(db), "dump").stdout == "192.0.2.1\t10\n192.0.2.2\t20\n"
    assert vsmtprelay("--db", str(db), "add", "192.0.2.3", "30").returncode == 0
    # makemap -u reads our update of its file.
    assert makemap_entries(db) == {"192.0.2.1": "10", "192.0.2.2": "20", "192.0.2.3": "30"}


def test_a_value_that_is_not_a_timestamp_is_reported_not_fatal(vsmtprelay: Run, db: Path) -> None:
    makemap("hash", str(db)[:-3], stdin="192.0.2.1\tRELAY\n192.0.2.2\t20\n")
    dump = vsmtprelay("--db", str(db), "dump")
    assert dump.returncode == 0
    assert dump.stdout == "192.0.2.1\tRELAY\n192.0.2.2\t20\n"
    assert "192.0.2.1" in dump.stderr
    assert "not a timestamp" in dump.stderr
    listing = vsmtprelay("--db", str(db), "list")
    assert listing.stdout == "192.0.2.2\t20\n"
    assert vsmtprelay("--db", str(db), "expire").returncode == 0
    assert makemap_entries(db) == {"192.0.2.1": "RELAY"}


def test_database_comes_from_config_then_environment_then_home(
    vsmtprelay: Run, tmp_path: Path
) -> None:
    configured = tmp_path / "configured.db"
    ini = tmp_path / "relayproxy.ini"
    ini.write_text(f"[store]\npath = {configured}\nipv6_keys = postfix\n")
    assert vsmtprelay("--config", str(ini), "add", "2001:db8::7", "1").returncode == 0
    # Postfix style from the config: the compressed form, no IPv6: prefix.
    assert makemap_entries(configured) == {"2001:db8::7": "1"}
    env = {"RELAYPROXY_CONFIG": str(ini)}
    assert vsmtprelay("dump", env=env).stdout == "2001:db8::7\t1\n"
    classic = tmp_path / "home" / "etc" / "relayers.db"
    missing_dir = vsmtprelay("add", "192.0.2.1", "2")
    assert missing_dir.returncode == 1
    assert missing_dir.stderr == f"vsmtprelay: cannot create {classic}: No such file or directory\n"
    classic.parent.mkdir(parents=True)
    assert vsmtprelay("add", "192.0.2.1", "2").returncode == 0
    assert makemap_entries(classic) == {"192.0.2.1": "2"}


def test_a_bad_config_names_file_section_and_key(vsmtprelay: Run, tmp_path: Path) -> None:
    ini = tmp_path / "bad.ini"
    ini.write_text("[store]\npath = relative.db\ncolour = blue\n")
    result = vsmtprelay("--config", str(ini), "dump")
    assert result.returncode == 2
    assert f"{ini}: [store] path: 'relative.db' is not an absolute path" in result.stderr
    assert f"{ini}: [store] colour: unknown key" in result.stderr


def test_root_leaves_files_the_daemon_user_can_still_write(vsmtprelay: Run, open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as two users")
    store_dir = open_dir / "store"
    store_dir.mkdir()
    os.chown(store_dir, 65534, 65534)
    db = store_dir / "relayers.db"
    assert vsmtprelay("--db", str(db), "add", "192.0.2.1", "1", user="65534").returncode == 0
    assert vsmtprelay("--db", str(db), "add", "192.0.2.2", "2").returncode == 0  # as root
    # The journal root rewrote still belongs to the daemon's user.
    assert vsmtprelay("--db", str(db), "add", "192.0.2.3", "3", user="65534").returncode == 0
    assert makemap_entries(db) == {"192.0.2.1": "1", "192.0.2.2": "2", "192.0.2.3": "3"}
    assert (db.stat().st_uid, Path(f"{db}.journal").stat().st_uid) == (65534, 65534)


def test_db_dump_and_db_load_round_trip_our_file(vsmtprelay: Run, db: Path) -> None:
    for n in range(30):
        vsmtprelay("--db", str(db), "add", f"198.51.100.{n}", str(1_700_000_000 + n))
    vsmtprelay("--db", str(db), "add", "2001:db8::99", "1700000099")
    dumped = subprocess.run([DB_DUMP, str(db)], capture_output=True, check=True).stdout
    loaded = db.parent / "loaded.db"
    subprocess.run([DB_LOAD, str(loaded)], input=dumped, check=True)
    assert (
        vsmtprelay("--db", str(loaded), "dump").stdout == vsmtprelay("--db", str(db), "dump").stdout
    )


def test_db_beside_a_config_keeps_every_other_store_setting(tmp_path: Path) -> None:
    ini = tmp_path / "relayproxy.ini"
    ini.write_text(
        "[store]\npath = /nowhere/relayers.db\nmode = 0640\nipv6_keys = both\n"
        "min_interval = 5\nlock_timeout = 2\nsync_interval = 0\n"
    )
    settings = _store_settings(str(tmp_path / "other.db"), str(ini))
    assert settings.path == str(tmp_path / "other.db")
    assert (settings.mode, settings.min_interval, settings.lock_timeout) == (0o640, 5, 2.0)
    assert settings.sync_interval == 0.0
    assert settings.ipv6_keys.value == "both"
