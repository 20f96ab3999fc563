"""man/relayproxy.8 and man/vsmtprelay.8: clean roff, and true to the code.

groff renders them with every warning on. What they must mention is taken
from the code, not from a list kept here: the configuration's sections and
keys from ``relayproxy.config``'s dataclasses, the commands from
``vsmtprelay.COMMANDS``, the options from each program's ``--help``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relayproxy import __version__, config
from relayproxy.cli import vsmtprelay

MAN = Path(__file__).resolve().parent.parent / "man"
DAEMON_PAGE = MAN / "relayproxy.8"
TOOL_PAGE = MAN / "vsmtprelay.8"
SCRIPTS = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    shutil.which("groff") is None, reason="groff is not installed (apt package groff-base)"
)


def groff(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", *args, str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )


def rendered(page: Path) -> str:
    """The page as text: no bold or underline, no SGR escapes."""
    result = groff(page, "-P-cbou")
    assert result.returncode == 0, result.stderr
    return result.stdout


def sections(page: Path) -> dict[str, str]:
    """``heading -> body`` of the rendered page (the footer line is the last heading)."""
    parts = re.split(r"^(\S.*)$", rendered(page), flags=re.M)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def subsections(body: str) -> dict[str, str]:
    """``[name] -> body`` of a section's subsections (``.SS``, indented three spaces)."""
    pieces = re.split(r"^   (\S.*)$", body, flags=re.M)
    return dict(zip(pieces[1::2], pieces[2::2], strict=True))


def tags(body: str) -> set[str]:
    """The first word of each item a ``.TP`` tag names: ``-h, --help`` gives -h and --help.

    Tags start at column 7 (the text under them at 14); a short tag shares its
    line with the text, so a word of that text may come along: harmless for a
    "these are all described" check.
    """
    found: set[str] = set()
    for line in body.splitlines():
        match = re.match(r" {7}(\S.*)", line)
        if match:
            found.update(piece.split()[0] for piece in match.group(1).split(", ") if piece.strip())
    return found


def help_options(program: str) -> set[str]:
    """The long and short options a program's --help lists."""
    result = subprocess.run(
        [str(SCRIPTS / program), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("options:", 1)[1]
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", options))


def config_sections() -> dict[str, set[str]]:
    """``section name -> its keys``, from the dataclasses load_config() fills."""
    found: dict[str, set[str]] = {}
    for field in dataclasses.fields(config.Config):
        if field.name == "source":
            continue
        if field.name == "listeners":
            name, cls = "listener:NAME", config.ListenerConfig
        else:
            name, cls = field.name, field.default_factory  # type: ignore[assignment]
        assert dataclasses.is_dataclass(cls), field.name
        found[name] = {f.name for f in dataclasses.fields(cls)} - {"name"}
    return found


@pytest.mark.parametrize("page", [DAEMON_PAGE, TOOL_PAGE], ids=lambda p: p.name)
def test_groff_renders_the_page_without_a_warning(page: Path) -> None:
    result = groff(page, "-z")
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("page", [DAEMON_PAGE, TOOL_PAGE], ids=lambda p: p.name)
def test_the_page_has_the_usual_sections_and_this_version(page: Path) -> None:
    headings = list(sections(page))
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "FILES"):
        assert heading in headings
    assert headings.index("SEE ALSO") == len(headings) - 2  # then the footer line
    assert "EXAMPLES" in headings
    assert f"relayproxy {__version__}" in headings[-1]


def test_every_vsmtprelay_command_is_described() -> None:
    page = sections(TOOL_PAGE)
    synopsis = " ".join(page["SYNOPSIS"].split())
    for command in vsmtprelay.COMMANDS:
        assert f"vsmtprelay [--db path | --config path] {command}" in synopsis
    assert set(vsmtprelay.COMMANDS) - tags(page["COMMANDS"]) == set()


@pytest.mark.parametrize(
    ("page", "program"), [(DAEMON_PAGE, "relayproxy"), (TOOL_PAGE, "vsmtprelay")]
)
def test_every_option_of_the_program_is_described(page: Path, program: str) -> None:
    assert help_options(program) - tags(sections(page)["OPTIONS"]) == set()


def test_every_configuration_section_and_key_is_described() -> None:
    described = subsections(sections(DAEMON_PAGE)["CONFIGURATION"])
    expected = config_sections()
    assert {f"[{name}]" for name in expected} == set(described)
    for name, keys in expected.items():
        assert keys - tags(described[f"[{name}]"]) == set(), name


def test_the_signals_and_exit_statuses_are_described() -> None:
    assert {"SIGHUP", "SIGTERM", "SIGUSR1"} <= tags(sections(DAEMON_PAGE)["SIGNALS"])
    for page in (DAEMON_PAGE, TOOL_PAGE):
        assert {"0", "1", "2"} <= tags(sections(page)["EXIT STATUS"])
