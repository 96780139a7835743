"""The manual pages (man/*.[58]), checked with mandoc (Debian package mandoc).

Every page is lint-clean at mandoc's warning level, names itself as its file does, and says
where py-hast extends or differs from base HAST (README's deviations): the fullsync default,
the second config-error line, node identity on Linux and HAST_NODE_NAME, the Linux frontend,
``--json``, ``hastctl create -e``, py-hast.conf.  Synopses, keywords and defaults are compared
with the code they document, so a page cannot drift from the program silently.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hast import config, ctl, daemon, settings

REPO = Path(__file__).resolve().parents[1]
MAN = REPO / "man"
PAGES = ("hastd.8", "hastctl.8", "hast.conf.5", "py-hast.conf.5")


def mandoc() -> str:
    path = shutil.which("mandoc")
    if path is None:
        pytest.fail("mandoc is required (Debian package mandoc)")
    return path


def source(page: str) -> str:
    return (MAN / page).read_text(encoding="ascii")


def render(page: str) -> str:
    """The page as text on one very long line per paragraph, whitespace collapsed."""
    res = subprocess.run([mandoc(), "-T", "ascii", "-O", "width=1000", str(MAN / page)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = re.sub(r".\x08", "", res.stdout)  # overstrike bold/underline
    return " ".join(text.split())


def section(page: str, name: str) -> str:
    """One section of the rendered page (up to the next upper-case section heading)."""
    res = subprocess.run([mandoc(), "-T", "ascii", "-O", "width=1000", str(MAN / page)],
                         capture_output=True, text=True)
    text = re.sub(r".\x08", "", res.stdout)
    m = re.search(rf"^{name}\n(.*?)(?=^[A-Z][A-Z ]+\n)", text, re.M | re.S)
    assert m, f"{page}: no {name} section"
    return " ".join(m.group(1).split())


def test_the_four_pages_and_nothing_else() -> None:
    assert sorted(p.name for p in MAN.iterdir()) == sorted(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_lint_clean(page: str) -> None:
    res = subprocess.run([mandoc(), "-T", "lint", "-W", "warning", str(MAN / page)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", \
        res.stdout + res.stderr


@pytest.mark.parametrize("page", PAGES)
def test_header_names_the_file(page: str) -> None:
    text = source(page)
    name, sec = page.rsplit(".", 1)
    assert re.search(rf"^\.Dt {re.escape(name.upper())} {sec}$", text, re.M)
    assert re.search(r"^\.Dd [A-Z][a-z]+ \d{1,2}, 20\d\d$", text, re.M)
    assert re.search(rf"^\.Sh NAME\n\.Nm {re.escape(name)}\n\.Nd ", text, re.M)
    assert "SPDX-License-Identifier: BSD-2-Clause" in text


@pytest.mark.parametrize("page", PAGES)
def test_says_fullsync_is_the_default(page: str) -> None:
    text = render(page)
    sentences = re.split(r"(?<=\.) ", text)
    assert any("fullsync" in s and "default" in s for s in sentences), page
    assert "memsync" in text, f"{page} does not name base hastd's default"
    assert "COMPATIBILITY" in text


# What each page must say about py-hast's deviations and extensions (README), as regular
# expressions over the rendered text.
DEVIATIONS = {
    "hastd.8": {
        "config error detail line": r"line counted from 1",
        "HAST_NODE_NAME": r"HAST_NODE_NAME",
        "node identity on Linux": r"machine ID.*/etc/hostid",
        "NBD socket": r"NBD protocol on the UNIX socket /var/run/hast/resource\.sock",
        "/dev/hast via nbdfuse + loop": r"loop device over the file that nbdfuse\(1\)",
        "kernel NBD": r"/dev/nbdN device of the kernel NBD client",
        "py-hast.conf": r"py-hast\.conf\(5\)",
        "FreeBSD names": r"rc name py_hastd.*/usr/local/sbin|/usr/local/sbin.*py_hastd",
        "SIGTERM waits for workers": r"waits for its workers",
    },
    "hastctl.8": {
        "-e not a power of two": r"Extent size \(N\) is not power of 2\.\W* and exits 65",
        "config error detail line": r"line counted from 1",
        "--json": r"--json",
        "HAST_NODE_NAME": r"HAST_NODE_NAME",
        "node identity on Linux": r"machine ID.*/etc/hostid",
        "Linux frontend": r"nbdfuse\(1\)",
        "py-hast.conf": r"py-hast\.conf\(5\)",
    },
    "hast.conf.5": {
        "config error detail line": r"line counted from 1",
        "HAST_NODE_NAME": r"HAST_NODE_NAME",
        "node identity on Linux": r"/etc/machine-id written as a UUID",
        "hostid on Linux": r"/etc/hostid",
        "Linux frontend": r"nbdfuse\(1\)",
        "py-hast.conf": r"py-hast\.conf\(5\)",
        "port's config path": r"/usr/local/etc/hast\.conf",
    },
    "py-hast.conf.5": {
        "NBD socket": r"NBD protocol .* on sockdir/resource\.sock",
        "/dev/hast via nbdfuse + loop": r"loop device .* nbdfuse\(1\)",
        "kernel NBD": r"kernel NBD device /dev/nbdN",
        "HAST_NODE_NAME": r"HAST_NODE_NAME",
        "node identity on Linux": r"machine ID and /etc/hostid",
    },
}


@pytest.mark.parametrize("page", PAGES)
def test_states_the_deviations(page: str) -> None:
    text = render(page)
    missing = [what for what, pattern in DEVIATIONS[page].items()
               if not re.search(pattern, text)]
    assert not missing, f"{page} does not say: {missing}"


# -- pages against the code -------------------------------------------------------------------

def test_hastd_synopsis_matches_getopt() -> None:
    synopsis = section("hastd.8", "SYNOPSIS")
    assert synopsis == "hastd [-dFh] [-c config] [-P pidfile]"
    assert f"hastd {daemon._USAGE}" == synopsis
    flags = set(daemon._OPTSTRING.replace(":", ""))
    documented = set(re.findall(r"^\.It Fl (\w)", source("hastd.8"), re.M))
    assert documented == flags


def test_hastctl_synopsis_matches_getopt() -> None:
    synopsis = section("hastctl.8", "SYNOPSIS")
    lines = re.findall(r"hastctl (\w+) ((?:(?!hastctl ).)*)", synopsis)
    assert [cmd for cmd, _ in lines] == list(ctl._OPTSTRINGS)
    for cmd, rest in lines:
        flags = set(re.findall(r"\[-(\w)", rest)) | set(re.findall(r"\[-d(\w+)\]", rest))
        expected = set(ctl._OPTSTRINGS[cmd].replace(":", "")) - {"h"}
        assert flags == expected, f"{cmd}: {sorted(flags)} != {sorted(expected)}"
        assert ("[--json]" in rest) == (cmd in ("list", "status")), cmd
    # FreeBSD's usage text, less py-hast's --json, is the synopsis
    usage = " ".join(ctl.usage_text("hastctl").replace("usage: ", "").split())
    assert " ".join(synopsis.replace(" [--json]", "").replace("<", "").replace(">", "")
                    .split()) == usage.replace("<", "").replace(">", "")


HAST_CONF_KEYWORDS = ("control", "pidfile", "listen", "replication", "checksum",
                      "compression", "timeout", "exec", "metaflush", "name", "local",
                      "remote", "source")


def test_hast_conf_documents_every_keyword_and_default() -> None:
    src = source("hast.conf.5")
    for keyword in HAST_CONF_KEYWORDS:
        assert re.search(rf"^\.It Ic {keyword}\b", src, re.M), keyword
    text = render("hast.conf.5")
    assert f"Default: {config.DEFAULT_CONTROL}" in text
    assert f"Default: {config.DEFAULT_PIDFILE}" in text
    assert f"Default: {config.DEFAULT_TIMEOUT}." in text
    assert f"{config.DEFAULT_CHECKSUM} (default)" in text
    assert f"{config.DEFAULT_COMPRESSION} (default" in text
    assert config.DEFAULT_REPLICATION == "fullsync"
    assert re.search(r"fullsync when the local disk and the secondary's disk have written it\."
                     r" This is py-hast's default", text)
    assert f"{config.DEFAULT_LISTEN_TCP4.removesuffix(':8457')}:{config.DEFAULT_PORT}" in text
    assert config.DEFAULT_CONFIG in text  # this platform's default path


def test_py_hast_conf_documents_every_setting_and_default() -> None:
    src = source("py-hast.conf.5")
    keywords = set(re.findall(r'key == "(\w+)"|key in \("(\w+)", "(\w+)"\)',
                              Path(settings.__file__).read_text()))
    keywords = {k for group in keywords for k in group if k}
    assert keywords == {"maxio", "direct", "devdir", "sockdir", "nbd"}
    for keyword in keywords:
        assert re.search(rf"^\.It Ic {keyword}\b", src, re.M), keyword
    text = render("py-hast.conf.5")
    defaults = settings.Settings()
    assert defaults.maxio == 1024 * 1024 and "Default: 1M." in text
    assert defaults.direct and re.search(r"O_DIRECT, bypassing the page cache, .*"
                                         r"unmarked difference; .* Default: on\.", text)
    assert f"Default: {defaults.devdir}." in text
    assert f"Default: {defaults.sockdir}." in text
    assert "from 4K to 1M" in text and settings.MAX_MAXIO == 1024 * 1024
    assert "beside this file" in render("hast.conf.5") and settings.FILENAME == "py-hast.conf"


def test_extent_size_message_is_hastctls() -> None:
    assert 'log.error(f"Extent size ({extentsize}) is not power of 2.")' in \
        Path(ctl.__file__).read_text()


def test_rc_script_facts() -> None:
    rc = (REPO / "files" / "py_hastd.in").read_text()
    pidfile = re.search(r'py_hastd_pidfile:="([^"]+)"', rc).group(1)
    text = render("hastd.8")
    assert f"{pidfile} Pidfile given by the port's rc script" in text
    assert "/usr/local/etc/rc.d/py_hastd" in text
    assert "sysrc hastd_enable=NO py_hastd_enable=YES" in text
