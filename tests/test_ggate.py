"""GEOM Gate frontend, verified without FreeBSD: the ABI of hast/ggate.h, hast/_ggate.pyx
against a simulated kernel, and hast.frontends.ggate on top of it.

1. ABI.  hast/ggate.h is our own transcription of <geom/gate/g_gate.h>; a wrong offset or
   ioctl number would only show on FreeBSD, as EINVAL or a corrupted request.  A small C
   file includes the header and stores every sizeof, offsetof, member size, ioctl number and
   constant in one uint64_t array; it is compiled to assembly (never linked, never run) for
   amd64 (gcc -m64), i386 (gcc -m32) and arm64 (aarch64-linux-gnu-gcc), and the array read
   back from the assembly is compared with literal values: hast-internals §11.3/§11.4 for
   amd64, and for the other two the values derived below from the same layout rules.  Linux
   and FreeBSD share the C ABI on these three (x86-64 SysV, i386 SysV, AAPCS64), and the
   header uses fixed-width types instead of the OS's typedefs, so the Linux targets lay the
   structures out as FreeBSD does.  -ffreestanding: only the compiler's own <stdint.h> is
   needed, no target C library (hence no gcc-multilib, which Debian does not allow next to
   gcc-aarch64-linux-gnu).  On FreeBSD the same constants are instead compared with the
   system's own <geom/gate/g_gate.h>.

2. hast/_ggate.pyx.  Translated with Cython and compiled with the host gcc against
   ggate.h's OS part (POSIX only, so no pretending to be FreeBSD is needed), with ioctl(2)
   renamed to a simulated /dev/ggctl written from sys/geom/gate/g_gate.c's behaviour
   (FAKE_KERNEL below).  This runs the real START/DONE/CREATE/CANCEL/MODIFY/DESTROY code
   paths, the ENOMEM retry and the buffer growth; the simulator checks the version and the
   amd64 request codes independently of the header.  What it cannot show is the real
   kernel's behaviour: that remains for a FreeBSD run (tests below marked freebsd).

3. hast.frontends.ggate on the simulated kernel with a stand-in primary: dispatch of every
   command, maxio splitting, errors, take-over of an existing device, stop, direct reads.

Tools: gcc (amd64, i386), aarch64-linux-gnu-gcc (Debian gcc-aarch64-linux-gnu), Cython.
A missing one is a failure.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAST = ROOT / "hast"
LINUX = sys.platform.startswith("linux")
FREEBSD = sys.platform.startswith("freebsd")

# -- 1. ABI ------------------------------------------------------------------------------

ARCHES = ("amd64", "arm64", "i386")

# Layout rules used for the expectations:
#   amd64 (x86-64 SysV) and arm64 (AAPCS64): LP64; int64_t (off_t), uintptr_t and pointers
#     are 8 bytes with 8-byte alignment, so arm64 equals amd64 -- hast-internals §11.4.
#   i386 (i386 SysV psABI, FreeBSD/i386 and gcc -m32 alike): uintptr_t and pointers are 4
#     bytes; int64_t is 8 bytes but only 4-byte aligned inside a structure, so the padding
#     §11.4 shows before each off_t disappears, and the structures are 4-byte aligned.
#     Worked out field by field from the tables of §11.4 (e.g. create: mediasize right
#     after version at 4, name at 28, info 28+255=283, readprov 283+2048=2331, 1 byte of
#     padding to 2588 for readoffset, unit at 2596, size 2600), then checked once against
#     clang --target=i386-unknown-freebsd14.0 (not needed by this test).
# Each field: (name, (offset, size) for amd64, arm64, i386).
LAYOUT: dict[str, tuple[tuple[int, int, int], list[tuple[str, tuple[int, int], ...]]]] = {
    "g_gate_ctl_create": ((2608, 2608, 2600), [
        ("gctl_version", (0, 4), (0, 4), (0, 4)),
        ("gctl_mediasize", (8, 8), (8, 8), (4, 8)),
        ("gctl_sectorsize", (16, 4), (16, 4), (12, 4)),
        ("gctl_flags", (20, 4), (20, 4), (16, 4)),
        ("gctl_maxcount", (24, 4), (24, 4), (20, 4)),
        ("gctl_timeout", (28, 4), (28, 4), (24, 4)),
        ("gctl_name", (32, 255), (32, 255), (28, 255)),
        ("gctl_info", (287, 2048), (287, 2048), (283, 2048)),
        ("gctl_readprov", (2335, 255), (2335, 255), (2331, 255)),
        ("gctl_readoffset", (2592, 8), (2592, 8), (2588, 8)),
        ("gctl_unit", (2600, 4), (2600, 4), (2596, 4)),
    ]),
    "g_gate_ctl_modify": ((2336, 2336, 2332), [
        ("gctl_version", (0, 4), (0, 4), (0, 4)),
        ("gctl_unit", (4, 4), (4, 4), (4, 4)),
        ("gctl_modify", (8, 4), (8, 4), (8, 4)),
        ("gctl_mediasize", (16, 8), (16, 8), (12, 8)),
        ("gctl_info", (24, 2048), (24, 2048), (20, 2048)),
        ("gctl_readprov", (2072, 255), (2072, 255), (2068, 255)),
        ("gctl_readoffset", (2328, 8), (2328, 8), (2324, 8)),
    ]),
    "g_gate_ctl_destroy": ((268, 268, 268), [
        ("gctl_version", (0, 4), (0, 4), (0, 4)),
        ("gctl_unit", (4, 4), (4, 4), (4, 4)),
        ("gctl_force", (8, 4), (8, 4), (8, 4)),
        ("gctl_name", (12, 255), (12, 255), (12, 255)),
    ]),
    "g_gate_ctl_cancel": ((272, 272, 268), [
        ("gctl_version", (0, 4), (0, 4), (0, 4)),
        ("gctl_unit", (4, 4), (4, 4), (4, 4)),
        ("gctl_seq", (8, 8), (8, 8), (8, 4)),
        ("gctl_name", (16, 255), (16, 255), (12, 255)),
    ]),
    "g_gate_ctl_io": ((56, 56, 40), [
        ("gctl_version", (0, 4), (0, 4), (0, 4)),
        ("gctl_unit", (4, 4), (4, 4), (4, 4)),
        ("gctl_seq", (8, 8), (8, 8), (8, 4)),
        ("gctl_cmd", (16, 4), (16, 4), (12, 4)),
        ("gctl_offset", (24, 8), (24, 8), (16, 8)),
        ("gctl_length", (32, 8), (32, 8), (24, 8)),
        ("gctl_data", (40, 8), (40, 8), (32, 4)),
        ("gctl_error", (48, 4), (48, 4), (36, 4)),
    ]),
}

# _IOWR('m', n, t) = 0xC0000000 | (sizeof(t) & 0x1fff) << 16 | 'm' << 8 | n.  amd64 from
# §11.3; arm64 has the same sizes; i386 from the sizes above (2600 = 0xa28, 2332 = 0x91c,
# 268 = 0x10c, 40 = 0x28).
IOCTLS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "G_GATE_CMD_CREATE": ("g_gate_ctl_create", (0xCA306D00, 0xCA306D00, 0xCA286D00)),
    "G_GATE_CMD_MODIFY": ("g_gate_ctl_modify", (0xC9206D01, 0xC9206D01, 0xC91C6D01)),
    "G_GATE_CMD_DESTROY": ("g_gate_ctl_destroy", (0xC10C6D02, 0xC10C6D02, 0xC10C6D02)),
    "G_GATE_CMD_CANCEL": ("g_gate_ctl_cancel", (0xC1106D03, 0xC1106D03, 0xC10C6D03)),
    "G_GATE_CMD_START": ("g_gate_ctl_io", (0xC0386D04, 0xC0386D04, 0xC0286D04)),
    "G_GATE_CMD_DONE": ("g_gate_ctl_io", (0xC0386D05, 0xC0386D05, 0xC0286D05)),
}

# §11.1/§11.2, the same on every platform (negative values as the 64-bit two's complement
# of the int the header defines).
CONSTANTS: dict[str, int] = {
    "G_GATE_VERSION": 3,
    "G_GATE_FLAG_READONLY": 0x0001,
    "G_GATE_FLAG_WRITEONLY": 0x0002,
    "G_GATE_FLAG_DESTROY": 0x1000,
    "G_GATE_UNIT_AUTO": -1 & (2**64 - 1),
    "G_GATE_NAME_GIVEN": -2 & (2**64 - 1),
    "G_GATE_INFOSIZE": 2048,
    "G_GATE_MAX_QUEUE_SIZE": 4096,
    "HAST_GG_NAME_MAX": 255,
    "GG_MODIFY_MEDIASIZE": 0x01,
    "GG_MODIFY_INFO": 0x02,
    "GG_MODIFY_READPROV": 0x04,
    "GG_MODIFY_READOFFSET": 0x08,
    "HAST_BIO_READ": 1,
    "HAST_BIO_WRITE": 2,
    "HAST_BIO_DELETE": 3,
    "HAST_BIO_GETATTR": 4,
    "HAST_BIO_FLUSH": 5,
    "HAST_BIO_CMD0": 6,
    "HAST_BIO_CMD1": 7,
    "HAST_BIO_CMD2": 8,
    "HAST_BIO_ZONE": 9,
    "HAST_BIO_SPEEDUP": 10,
}

# compiler command and the predefined macro proving the target
COMPILERS: dict[str, tuple[list[str], str]] = {
    "amd64": (["gcc", "-m64"], "__x86_64__"),
    "i386": (["gcc", "-m32"], "__i386__"),
    "arm64": (["aarch64-linux-gnu-gcc"], "__aarch64__"),
}
PACKAGES = {"gcc": "gcc", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}


def _entries() -> list[tuple[str, str]]:
    """(key, C expression) in array order."""
    out: list[tuple[str, str]] = []
    for struct, (_sizes, fields) in LAYOUT.items():
        out.append((f"sizeof {struct}", f"sizeof(struct {struct})"))
        for name, *_ in fields:
            out.append((f"offsetof {struct}.{name}", f"offsetof(struct {struct}, {name})"))
            out.append((f"sizeof {struct}.{name}", f"sizeof(((struct {struct} *)0)->{name})"))
    out += [(name, name) for name in IOCTLS]
    out += [(name, f"(uint64_t)(int64_t)({name})") for name in CONSTANTS]
    return out


def _layout_source(guard: str, system_header: bool = False) -> str:
    lines = [f"#if !defined({guard})", f'#error "not a {guard} compiler"', "#endif"]
    if system_header:
        # FreeBSD: the kernel's own header; HAST_* names map onto the system's.
        lines += ["#include <sys/param.h>", "#include <sys/ioccom.h>", "#include <sys/bio.h>",
                  "#include <geom/gate/g_gate.h>", "#include <limits.h>", "#include <stddef.h>",
                  "#include <stdint.h>", "#define HAST_GG_NAME_MAX NAME_MAX"]
        lines += [f"#define HAST_BIO_{n} BIO_{n}" for n in
                  ("READ", "WRITE", "DELETE", "GETATTR", "FLUSH", "CMD0", "CMD1", "CMD2",
                   "ZONE", "SPEEDUP")]
    else:
        lines += ["#define HAST_GGATE_ABI_ONLY 1", '#include "ggate.h"', "#include <stddef.h>"]
    exprs = ",\n  ".join(f"(uint64_t)({expr})" for _key, expr in _entries())
    lines.append(f"const uint64_t hast_layout[] = {{\n  {exprs}\n}};")
    return "\n".join(lines) + "\n"


# bytes per data directive in gcc's assembly for these targets
_DIRECTIVES = {".quad": 8, ".xword": 8, ".8byte": 8, ".dword": 8, ".long": 4, ".4byte": 4,
               ".int": 4}


def _parse_array(asm: str, symbol: str = "hast_layout") -> list[int]:
    """The little-endian uint64_t array ``symbol`` from gcc -S output."""
    lines = asm.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == f"{symbol}:")
    except StopIteration:
        raise AssertionError(f"no {symbol} in the assembly") from None
    raw = bytearray()
    for line in lines[start + 1:]:
        fields = line.split("#")[0].split("//")[0].split()
        if not fields:
            continue
        op = fields[0]
        if op.endswith(":") or op in (".size", ".text", ".section", ".ident", ".globl"):
            break
        if op == ".zero":
            raw += bytes(int(fields[1]))
            continue
        if op not in _DIRECTIVES:
            raise AssertionError(f"unexpected directive in {symbol}: {line!r}")
        width = _DIRECTIVES[op]
        raw += (int(fields[1], 0) & ((1 << 8 * width) - 1)).to_bytes(width, "little")
    assert len(raw) % 8 == 0, f"{symbol}: {len(raw)} bytes"
    return [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]


def _compile_layout(arch: str, tmp: Path) -> dict[str, int]:
    cmd, guard = COMPILERS[arch]
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} not found: install the Debian package {PACKAGES[cmd[0]]}")
    src = tmp / f"layout-{arch}.c"
    src.write_text(_layout_source(guard))
    res = subprocess.run([*cmd, "-std=c11", "-ffreestanding", "-O0", "-Wall", "-Werror",
                          f"-I{HAST}", "-S", "-o", "-", str(src)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr}"
    values = _parse_array(res.stdout)
    keys = [key for key, _ in _entries()]
    assert len(values) == len(keys), f"{arch}: {len(values)} values for {len(keys)} entries"
    return dict(zip(keys, values, strict=True))


def _expected(arch: str) -> dict[str, int]:
    col = ARCHES.index(arch)
    out: dict[str, int] = {}
    for struct, (sizes, fields) in LAYOUT.items():
        out[f"sizeof {struct}"] = sizes[col]
        for name, *places in fields:
            offset, size = places[col]
            out[f"offsetof {struct}.{name}"] = offset
            out[f"sizeof {struct}.{name}"] = size
    for name, (_struct, codes) in IOCTLS.items():
        out[name] = codes[col]
    out.update(CONSTANTS)
    return out


def _iowr(group: str, num: int, size: int) -> int:
    """FreeBSD's <sys/ioccom.h>: IOC_INOUT | (len & IOCPARM_MASK) << 16 | group << 8 | num."""
    return 0x80000000 | 0x40000000 | (size & ((1 << 13) - 1)) << 16 | ord(group) << 8 | num


@pytest.mark.skipif(not LINUX, reason="cross-compiles for Linux targets; FreeBSD compares "
                    "with its own header instead (test_layout_matches_system_header)")
@pytest.mark.parametrize("arch", ARCHES)
def test_layout(arch: str, tmp_path: Path) -> None:
    got = _compile_layout(arch, tmp_path)
    expected = _expected(arch)
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert not wrong, f"{arch}: (got, expected) {wrong}"
    # and every request code is the ioccom encoding of the structure's size on that arch
    for num, (name, (struct, _codes)) in enumerate(IOCTLS.items()):
        assert got[name] == _iowr("m", num, got[f"sizeof {struct}"]), name


def test_amd64_expectations_are_the_spec() -> None:
    """The amd64 column is §11.3's table: sizes and codes as printed there."""
    spec = {"G_GATE_CMD_CREATE": (2608, 0xCA306D00), "G_GATE_CMD_MODIFY": (2336, 0xC9206D01),
            "G_GATE_CMD_DESTROY": (268, 0xC10C6D02), "G_GATE_CMD_CANCEL": (272, 0xC1106D03),
            "G_GATE_CMD_START": (56, 0xC0386D04), "G_GATE_CMD_DONE": (56, 0xC0386D05)}
    for num, (name, (size, code)) in enumerate(spec.items()):
        struct, codes = IOCTLS[name]
        assert LAYOUT[struct][0][0] == size
        assert codes[0] == code == _iowr("m", num, size)
    # i386: the same encoding of the derived sizes
    for num, (struct, codes) in enumerate(IOCTLS.values()):
        assert codes[2] == _iowr("m", num, LAYOUT[struct][0][2])


@pytest.mark.skipif(not FREEBSD, reason="needs FreeBSD's <geom/gate/g_gate.h>")
def test_layout_matches_system_header(tmp_path: Path) -> None:
    """On FreeBSD: our header and the kernel's give the same numbers (native cc)."""
    cc = os.environ.get("CC", "cc")
    guard = "__FreeBSD__"
    results = []
    for system in (False, True):
        src = tmp_path / f"layout-{int(system)}.c"
        src.write_text(_layout_source(guard, system_header=system))
        res = subprocess.run([cc, "-O0", f"-I{HAST}", "-S", "-o", "-", str(src)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        results.append(_parse_array(res.stdout))
    assert results[0] == results[1]


# -- 2. hast/_ggate.pyx on a simulated /dev/ggctl -----------------------------------------

# A user-space stand-in for the ioctl side of sys/geom/gate/g_gate.c (FreeBSD 14), reduced
# to one device.  It uses ggate.h's structures (their layout is test_layout's business)
# but its own literal request codes, as the amd64 kernel knows them.
FAKE_KERNEL = r"""
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include "ggate.h"

#define K_CREATE  0xCA306D00UL
#define K_MODIFY  0xC9206D01UL
#define K_DESTROY 0xC10C6D02UL
#define K_CANCEL  0xC1106D03UL
#define K_START   0xC0386D04UL
#define K_DONE    0xC0386D05UL
#define NB 256

struct fbio {
    uint64_t seq;
    unsigned cmd;
    int64_t offset, length;
    unsigned char *data;
    int state;    /* 0 free, 1 queued, 2 out (handed to userland), 3 done */
    int error;
};

static pthread_mutex_t mtx = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static struct fbio bios[NB];
static int inq[NB], nin;    /* FIFO of queued bios (indexes) */
static uint64_t next_seq;
static int created, destroyed, unit_no;
static char dev_name[256], existing[256];
static int existing_unit;
static struct g_gate_ctl_create last_create;
static struct g_gate_ctl_modify last_modify;
static struct g_gate_ctl_destroy last_destroy;
static struct g_gate_ctl_cancel last_cancel;
static int64_t n_create, n_modify, n_destroy, n_cancel, n_start, n_done, n_done_unknown;
static int64_t n_enomem, n_badversion, n_badcmd, n_sleeping;

void
fake_reset(void)
{
    pthread_mutex_lock(&mtx);
    for (int i = 0; i < NB; i++) {
        free(bios[i].data);
        memset(&bios[i], 0, sizeof(bios[i]));
    }
    nin = 0;
    next_seq = 1000;
    created = destroyed = 0;
    unit_no = -1;
    dev_name[0] = existing[0] = '\0';
    existing_unit = -1;
    memset(&last_create, 0, sizeof(last_create));
    memset(&last_modify, 0, sizeof(last_modify));
    memset(&last_destroy, 0, sizeof(last_destroy));
    memset(&last_cancel, 0, sizeof(last_cancel));
    n_create = n_modify = n_destroy = n_cancel = n_start = n_done = n_done_unknown = 0;
    n_enomem = n_badversion = n_badcmd = n_sleeping = 0;
    pthread_mutex_unlock(&mtx);
}

/* A device "left behind by a dead worker": CREATE of this name answers EEXIST. */
void
fake_set_existing(const char *name, int unit)
{
    pthread_mutex_lock(&mtx);
    snprintf(existing, sizeof(existing), "%s", name);
    existing_unit = unit;
    pthread_mutex_unlock(&mtx);
}

/* Queue a request (state 1), or hand it out already (state 2: taken by the dead worker). */
uint64_t
fake_push(unsigned cmd, int64_t offset, int64_t length, int fill, int state)
{
    uint64_t seq = 0;

    pthread_mutex_lock(&mtx);
    for (int i = 0; i < NB; i++) {
        struct fbio *b = &bios[i];
        if (b->state != 0)
            continue;
        b->seq = seq = next_seq++;
        b->cmd = cmd;
        b->offset = offset;
        b->length = length;
        b->error = -1;
        free(b->data);
        b->data = NULL;
        if (cmd == HAST_BIO_READ || cmd == HAST_BIO_WRITE) {
            b->data = malloc((size_t)length);
            memset(b->data, cmd == HAST_BIO_WRITE ? fill : 0x5a, (size_t)length);
        }
        b->state = state;
        if (state == 1)
            inq[nin++] = i;
        break;
    }
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mtx);
    return (seq);
}

static struct fbio *
find(uint64_t seq)
{
    for (int i = 0; i < NB; i++)
        if (bios[i].state != 0 && bios[i].seq == seq)
            return (&bios[i]);
    return (NULL);
}

/* Wait until request seq is done: its error, or -1 after timeout_ms. */
int
fake_wait(uint64_t seq, int timeout_ms)
{
    struct timespec ts;
    struct fbio *b;
    int err = -1;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&mtx);
    while ((b = find(seq)) != NULL && b->state != 3)
        if (pthread_cond_timedwait(&cv, &mtx, &ts) != 0)
            break;
    if (b != NULL && b->state == 3)
        err = b->error;
    pthread_mutex_unlock(&mtx);
    return (err);
}

int
fake_data(uint64_t seq, unsigned char *out, int64_t len)
{
    struct fbio *b;
    int rv = -1;

    pthread_mutex_lock(&mtx);
    if ((b = find(seq)) != NULL && b->data != NULL && len <= b->length) {
        memcpy(out, b->data, (size_t)len);
        rv = 0;
    }
    pthread_mutex_unlock(&mtx);
    return (rv);
}

/* Someone else destroys the device (ggatec destroy -f, a second hastd...). */
void
fake_destroy_now(void)
{
    pthread_mutex_lock(&mtx);
    destroyed = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mtx);
}

int64_t
fake_get(const char *key)
{
#define K(k, v) if (strcmp(key, k) == 0) return (int64_t)(v)
    K("create.count", n_create); K("create.version", last_create.gctl_version);
    K("create.mediasize", last_create.gctl_mediasize);
    K("create.sectorsize", last_create.gctl_sectorsize);
    K("create.flags", last_create.gctl_flags); K("create.maxcount", last_create.gctl_maxcount);
    K("create.timeout", last_create.gctl_timeout); K("create.unit", last_create.gctl_unit);
    K("create.readoffset", last_create.gctl_readoffset);
    K("create.info0", last_create.gctl_info[0]);
    K("create.readprov0", last_create.gctl_readprov[0]);
    K("modify.count", n_modify); K("modify.mask", last_modify.gctl_modify);
    K("modify.unit", last_modify.gctl_unit);
    K("modify.readoffset", last_modify.gctl_readoffset);
    K("destroy.count", n_destroy); K("destroy.force", last_destroy.gctl_force);
    K("destroy.unit", last_destroy.gctl_unit);
    K("cancel.count", n_cancel); K("cancel.unit", last_cancel.gctl_unit);
    K("cancel.seq", last_cancel.gctl_seq);
    K("start.count", n_start); K("done.count", n_done); K("done.unknown", n_done_unknown);
    K("enomem.count", n_enomem); K("badversion.count", n_badversion);
    K("badcmd.count", n_badcmd); K("destroyed", destroyed); K("unit", unit_no);
    K("queued", nin); K("sleeping", n_sleeping);
#undef K
    return (-999);
}

const char *
fake_get_str(const char *key)
{
    if (strcmp(key, "create.name") == 0) return (last_create.gctl_name);
    if (strcmp(key, "cancel.name") == 0) return (last_cancel.gctl_name);
    if (strcmp(key, "modify.readprov") == 0) return (last_modify.gctl_readprov);
    return ("?");
}

static int
fail(int err)
{
    errno = err;
    return (-1);
}

static void
fail_all(int err)
{
    for (int i = 0; i < NB; i++)
        if (bios[i].state == 1 || bios[i].state == 2) {
            bios[i].state = 3;
            bios[i].error = err;
        }
    nin = 0;
}

static int
k_create(struct g_gate_ctl_create *c)
{
    n_create++;
    last_create = *c;
    if (c->gctl_mediasize <= 0 || c->gctl_sectorsize == 0 ||
        (c->gctl_sectorsize & (c->gctl_sectorsize - 1)) != 0 ||
        c->gctl_mediasize % c->gctl_sectorsize != 0)
        return (fail(EINVAL));
    if ((c->gctl_flags & G_GATE_USERFLAGS) == G_GATE_USERFLAGS)
        return (fail(EINVAL));
    if (c->gctl_unit == G_GATE_NAME_GIVEN && c->gctl_name[0] == '\0')
        return (fail(EINVAL));
    if (existing[0] != '\0' && strcmp(c->gctl_name, existing) == 0)
        return (fail(EEXIST));
    created = 1;
    destroyed = 0;
    unit_no = c->gctl_unit >= 0 ? c->gctl_unit : 0;
    snprintf(dev_name, sizeof(dev_name), "%s", c->gctl_name);
    c->gctl_unit = unit_no;
    return (0);
}

static int
k_cancel(struct g_gate_ctl_cancel *c)
{
    int moved[NB], n = 0;

    n_cancel++;
    last_cancel = *c;
    if (c->gctl_unit == G_GATE_NAME_GIVEN) {
        if (existing[0] != '\0' && strcmp(c->gctl_name, existing) == 0) {
            created = 1;    /* adopted */
            unit_no = existing_unit;
            snprintf(dev_name, sizeof(dev_name), "%s", existing);
        } else if (!created || strcmp(c->gctl_name, dev_name) != 0)
            return (fail(ENXIO));
    } else if (!created || c->gctl_unit != unit_no)
        return (fail(ENXIO));
    /* requests handed to userland go back to the head of the queue, in order */
    for (int i = 0; i < NB; i++)
        if (bios[i].state == 2 && (c->gctl_seq == 0 || bios[i].seq == c->gctl_seq)) {
            bios[i].state = 1;
            moved[n++] = i;
        }
    memmove(inq + n, inq, sizeof(inq[0]) * (size_t)nin);
    memcpy(inq, moved, sizeof(inq[0]) * (size_t)n);
    nin += n;
    if (c->gctl_unit == G_GATE_NAME_GIVEN)
        c->gctl_unit = unit_no;
    pthread_cond_broadcast(&cv);
    return (0);
}

static int
k_start(struct g_gate_ctl_io *io)
{
    struct fbio *b;

    if (!created || destroyed || io->gctl_unit != unit_no)
        return (fail(ENXIO));
    while (nin == 0) {
        if (destroyed) {
            io->gctl_error = ECANCELED;
            return (0);
        }
        n_sleeping++;
        pthread_cond_wait(&cv, &mtx);
        n_sleeping--;
    }
    b = &bios[inq[0]];
    io->gctl_cmd = b->cmd;
    if (b->cmd == HAST_BIO_WRITE && b->length > io->gctl_length) {
        n_enomem++;
        io->gctl_length = b->length;
        io->gctl_error = ENOMEM;
        return (0);
    }
    memmove(inq, inq + 1, sizeof(inq[0]) * (size_t)--nin);
    b->state = 2;
    n_start++;
    io->gctl_seq = (uintptr_t)b->seq;
    io->gctl_offset = b->offset;
    io->gctl_length = b->length;
    if (b->cmd == HAST_BIO_WRITE)
        memcpy(io->gctl_data, b->data, (size_t)b->length);
    return (0);
}

static int
k_done(struct g_gate_ctl_io *io)
{
    struct fbio *b;

    if (!created || destroyed || io->gctl_unit != unit_no)
        return (fail(ENOENT));
    b = find(io->gctl_seq);
    if (b == NULL || b->state != 2) {
        n_done_unknown++;    /* cancelled meanwhile: ignored */
        return (0);
    }
    n_done++;
    if (io->gctl_error == 0 && b->cmd == HAST_BIO_READ) {
        if (io->gctl_length != b->length)
            return (fail(EFAULT));
        memcpy(b->data, io->gctl_data, (size_t)b->length);
    }
    b->error = io->gctl_error;
    b->state = 3;
    pthread_cond_broadcast(&cv);
    return (0);
}

int
hast_fake_ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    void *arg;
    int rv;

    (void)fd;
    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (*(unsigned int *)arg != 3) {    /* G_GATE_CHECK_VERSION */
        n_badversion++;
        return (fail(EINVAL));
    }
    pthread_mutex_lock(&mtx);
    switch (request) {
    case K_CREATE: rv = k_create(arg); break;
    case K_CANCEL: rv = k_cancel(arg); break;
    case K_START: rv = k_start(arg); break;
    case K_DONE: rv = k_done(arg); break;
    case K_MODIFY:
        n_modify++;
        last_modify = *(struct g_gate_ctl_modify *)arg;
        if (!created || last_modify.gctl_unit != unit_no)
            rv = fail(ENXIO);
        else if (strncmp(last_modify.gctl_readprov, "/nonexistent", 12) == 0)
            rv = fail(EINVAL);    /* g_provider_by_name() found nothing */
        else
            rv = 0;
        break;
    case K_DESTROY:
        n_destroy++;
        last_destroy = *(struct g_gate_ctl_destroy *)arg;
        if (!created || last_destroy.gctl_unit != unit_no) {
            rv = fail(ENXIO);
            break;
        }
        destroyed = 1;
        fail_all(ENXIO);
        pthread_cond_broadcast(&cv);
        rv = 0;
        break;
    default:
        n_badcmd++;
        rv = fail(ENOTTY);
    }
    pthread_mutex_unlock(&mtx);
    return (rv);
}
"""


class Fake:
    """ctypes handle on the simulated kernel linked into the test build of hast._ggate."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.fake_push.restype = ctypes.c_uint64
        lib.fake_push.argtypes = [ctypes.c_uint, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                  ctypes.c_int]
        lib.fake_wait.argtypes = [ctypes.c_uint64, ctypes.c_int]
        lib.fake_data.argtypes = [ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int64]
        lib.fake_get.restype = ctypes.c_int64
        lib.fake_get.argtypes = [ctypes.c_char_p]
        lib.fake_get_str.restype = ctypes.c_char_p
        lib.fake_get_str.argtypes = [ctypes.c_char_p]
        lib.fake_set_existing.argtypes = [ctypes.c_char_p, ctypes.c_int]

    def reset(self) -> None:
        self.lib.fake_reset()

    def push(self, cmd: int, offset: int, length: int, fill: int = 0,
             handed_out: bool = False) -> int:
        return self.lib.fake_push(cmd, offset, length, fill, 2 if handed_out else 1)

    def wait(self, seq: int, timeout: float = 5.0) -> int:
        err = self.lib.fake_wait(seq, int(timeout * 1000))
        assert err != -1, f"request {seq} not completed within {timeout} s"
        return err

    def data(self, seq: int, length: int) -> bytes:
        out = ctypes.create_string_buffer(length)
        assert self.lib.fake_data(seq, out, length) == 0
        return out.raw

    def get(self, key: str) -> int:
        value = self.lib.fake_get(key.encode())
        assert value != -999, key
        return value

    def get_str(self, key: str) -> str:
        return self.lib.fake_get_str(key.encode()).decode()

    def set_existing(self, name: str, unit: int) -> None:
        self.lib.fake_set_existing(name.encode(), unit)

    def wait_sleeping(self, timeout: float = 5.0) -> None:
        """Until a START sleeps in the simulated kernel."""
        deadline = time.monotonic() + timeout
        while self.get("sleeping") == 0:
            assert time.monotonic() < deadline, "no START sleeping"
            time.sleep(0.01)

    def destroy_now(self) -> None:
        self.lib.fake_destroy_now()


def _build_ggate(out: Path) -> Path:
    """Cython-translate hast/_ggate.pyx and link it with FAKE_KERNEL as ioctl(2)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: install the Debian package gcc")
    csrc = out / "_ggate.c"
    res = subprocess.run([sys.executable, "-m", "cython", "-3", "-I", str(HAST),
                          "hast/_ggate.pyx", "-o", str(csrc)],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"cython failed (is Cython installed?):\n{res.stderr}"
    fake = out / "fake_ggctl.c"
    fake.write_text(FAKE_KERNEL)
    so = out / f"_ggate{sysconfig.get_config_var('EXT_SUFFIX')}"
    include = sysconfig.get_paths()["include"]
    # -Dioctl=...: every ioctl(2) of ggate.h's OS part lands in the simulator.
    cmd = [gcc, "-shared", "-fPIC", "-O1", "-g", "-pthread", "-Wall",
           "-Dioctl=hast_fake_ioctl", f"-I{HAST}", f"-I{include}",
           str(csrc), str(fake), "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"building the test _ggate failed:\n{res.stderr}"
    # ggate.h's own code must compile without a warning (Cython's output may have some)
    noisy = [line for line in res.stderr.splitlines() if "ggate.h" in line or "fake_" in line]
    assert not noisy, "\n".join(noisy)
    return so


@pytest.fixture(scope="session")
def ggate_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[types.ModuleType, Fake]:
    so = _build_ggate(tmp_path_factory.mktemp("ggate-build"))
    spec = importlib.util.spec_from_file_location("hast._ggate", so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, Fake(ctypes.CDLL(str(so)))


@pytest.fixture
def gg(ggate_build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(hast._ggate built on the simulator, the simulator, a stand-in /dev/ggctl path)."""
    module, fake = ggate_build
    fake.reset()
    monkeypatch.setitem(sys.modules, "hast._ggate", module)
    ctl = tmp_path / "ggctl"
    ctl.touch()
    return module, fake, str(ctl)


def test_module_constants(gg) -> None:
    mod, _fake, _path = gg
    assert mod.CTL_PATH == "/dev/ggctl"
    assert (mod.KLD_MODNAME, mod.KLD_FILE) == ("g_gate", "geom_gate")
    assert mod.VERSION == 3 and mod.NAME_GIVEN == -2 and mod.UNIT_AUTO == -1
    assert (mod.BIO_READ, mod.BIO_WRITE, mod.BIO_DELETE, mod.BIO_FLUSH) == (1, 2, 3, 5)
    # the codes of the host build are the amd64 ones (this test runs on x86-64)
    if sysconfig.get_platform().endswith("x86_64"):
        assert [mod.CMD_CREATE, mod.CMD_MODIFY, mod.CMD_DESTROY, mod.CMD_CANCEL,
                mod.CMD_START, mod.CMD_DONE] == [c[0] for _s, c in IOCTLS.values()]


def test_open_missing_control_device(gg, tmp_path: Path) -> None:
    mod, _fake, _path = gg
    with pytest.raises(FileNotFoundError) as info:
        mod.Control(tmp_path / "nonexistent")
    assert info.value.filename == str(tmp_path / "nonexistent")


def test_create_as_hastd(gg) -> None:
    mod, fake, path = gg
    ctl = mod.Control(path)
    assert ctl.create("hast/test", 1 << 20, 4096) == 0
    assert ctl.unit == 0
    assert fake.get_str("create.name") == "hast/test"
    assert fake.get("create.version") == 3
    assert fake.get("create.unit") == -2            # G_GATE_NAME_GIVEN
    assert fake.get("create.mediasize") == 1 << 20
    assert fake.get("create.sectorsize") == 4096
    for key in ("create.flags", "create.maxcount", "create.timeout", "create.readoffset",
                "create.info0", "create.readprov0"):
        assert fake.get(key) == 0, key
    ctl.close()


def test_create_errors(gg) -> None:
    mod, fake, path = gg
    ctl = mod.Control(path)
    with pytest.raises(OSError) as info:
        ctl.create("hast/" + "x" * 250, 1 << 20, 512)
    assert info.value.errno == errno.ENAMETOOLONG
    assert fake.get("create.count") == 0            # refused before the ioctl
    with pytest.raises(OSError) as info:
        ctl.create("hast/test", 1000, 512)          # not a multiple of the sector size
    assert info.value.errno == errno.EINVAL
    fake.set_existing("hast/test", 5)
    with pytest.raises(FileExistsError):
        ctl.create("hast/test", 1 << 20, 512)
    assert ctl.cancel(name="hast/test") == 5        # hastd's take-over
    assert ctl.unit == 5
    assert (fake.get("cancel.unit"), fake.get("cancel.seq")) == (-2, 0)
    assert fake.get_str("cancel.name") == "hast/test"


def test_start_done_write_and_read(gg) -> None:
    mod, fake, path = gg
    ctl = mod.Control(path)
    ctl.create("hast/test", 1 << 20, 512)
    req = mod.Request(65536)
    assert req.capacity == 65536
    seq = fake.push(mod.BIO_WRITE, 8192, 4096, fill=0xAB)
    assert ctl.start(req) == 0
    assert (req.cmd, req.seq, req.offset, req.length) == (mod.BIO_WRITE, seq, 8192, 4096)
    assert bytes(req.data) == b"\xab" * 4096
    ctl.done(req, 0)
    assert fake.wait(seq) == 0

    seq = fake.push(mod.BIO_READ, 0, 8192)
    assert ctl.start(req) == 0
    assert (req.cmd, req.length) == (mod.BIO_READ, 8192)
    req.data[:] = bytes(range(256)) * 32
    ctl.done(req, 0)
    assert fake.wait(seq) == 0
    assert fake.data(seq, 8192) == bytes(range(256)) * 32

    seq = fake.push(mod.BIO_READ, 0, 512)
    assert ctl.start(req) == 0
    ctl.done(req, errno.EIO)
    assert fake.wait(seq) == errno.EIO
    assert fake.get("badversion.count") == fake.get("badcmd.count") == 0


def test_enomem_grows_the_buffer(gg) -> None:
    """A WRITE larger than gctl_length: the kernel says ENOMEM and keeps it queued."""
    mod, fake, path = gg
    ctl = mod.Control(path)
    ctl.create("hast/test", 1 << 24, 512)
    req = mod.Request(4096)
    seq = fake.push(mod.BIO_WRITE, 0, 1 << 20, fill=0x11)
    assert ctl.start(req) == 0
    assert fake.get("enomem.count") == 1
    assert req.capacity >= 1 << 20 and req.seq == seq
    assert bytes(req.data) == b"\x11" * (1 << 20)
    ctl.done(req, 0)
    assert fake.wait(seq) == 0


def test_long_read_grows_the_buffer(gg) -> None:
    """The kernel hands out a READ of any length; DONE copies that many bytes."""
    mod, fake, path = gg
    ctl = mod.Control(path)
    ctl.create("hast/test", 1 << 24, 512)
    req = mod.Request(4096)
    seq = fake.push(mod.BIO_READ, 0, 300 * 1024)
    assert ctl.start(req) == 0
    assert req.capacity >= 300 * 1024
    req.data[:] = b"\x77" * (300 * 1024)
    ctl.done(req, 0)
    assert fake.wait(seq) == 0
    assert fake.data(seq, 300 * 1024) == b"\x77" * (300 * 1024)


def test_destroy_wakes_start(gg) -> None:
    mod, fake, path = gg
    ctl = mod.Control(path)
    ctl.create("hast/test", 1 << 20, 512)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(ctl.start(mod.Request(4096))))
    thread.start()
    fake.wait_sleeping()             # START sleeps in the "kernel", the GIL released
    assert thread.is_alive() and not result
    ctl.destroy(force=True)
    thread.join(5)
    assert result == [errno.ECANCELED]
    assert (fake.get("destroy.force"), fake.get("destroy.unit")) == (1, 0)
    ctl.close()


def test_modify_direct_reads(gg) -> None:
    mod, fake, path = gg
    ctl = mod.Control(path)
    ctl.create("hast/test", 1 << 20, 512)
    ctl.modify(readprov="/dev/ada0p1", readoffset=2 << 20)
    assert fake.get("modify.mask") == 0x04 | 0x08
    assert fake.get_str("modify.readprov") == "/dev/ada0p1"
    assert fake.get("modify.readoffset") == 2 << 20
    assert fake.get("modify.unit") == 0
    with pytest.raises(OSError) as info:
        ctl.modify(readprov="/nonexistent/file", readoffset=0)
    assert info.value.errno == errno.EINVAL


def test_close_defers_to_running_ioctl(gg) -> None:
    """close() while START sleeps: no new ioctl starts, the sleeping one finishes."""
    mod, fake, path = gg
    ctl = mod.Control(path)
    ctl.create("hast/test", 1 << 20, 512)
    req = mod.Request(4096)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(ctl.start(req)))
    thread.start()
    fake.wait_sleeping()
    ctl.close()
    assert ctl.closed
    with pytest.raises(OSError) as info:
        ctl.done(req, 0)
    assert info.value.errno == errno.EBADF
    seq = fake.push(mod.BIO_FLUSH, 0, 0)
    thread.join(5)
    assert result == [0] and req.seq == seq


def test_pool_limit_and_close(gg) -> None:
    mod, _fake, _path = gg
    pool = mod.RequestPool(8192, 2)
    a, b = pool.acquire(), pool.acquire()
    assert a is not b and a.capacity == 8192
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    time.sleep(0.1)
    assert not got                    # both in flight: the third waits
    pool.release(a)
    waiter.join(5)
    assert got == [a] and pool.in_use == 2
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    pool.close()
    waiter.join(5)
    assert got[-1] is None


# -- 3. hast.frontends.ggate on the simulated kernel ---------------------------------------

class StandInPrimary:
    """What GgateFrontend uses of hast.primary.Primary, over a bytearray; completes every
    request from another thread, as the primary's local/remote threads do."""

    def __init__(self, datasize: int = 1 << 22, maxio: int = 65536) -> None:
        self.disk = bytearray(datasize)
        self.datasize = datasize
        self.sectorsize = 512
        self.maxio = maxio
        self.localoff = 1 << 20
        self.syncsrc = 0
        self.res = types.SimpleNamespace(name="test", provname="test", local="/dev/ada0p1")
        self.calls: list[tuple] = []
        self.fail: dict[str, int] = {}
        self.exits: list[int] = []
        self.exited = threading.Event()

    def _later(self, done, err: int) -> None:
        threading.Thread(target=done, args=(err,)).start()

    def submit_read(self, offset: int, length: int, buf: memoryview, done) -> None:
        self.calls.append(("read", offset, length))
        assert buf.nbytes == length and not buf.readonly
        buf[:] = self.disk[offset:offset + length]
        self._later(done, self.fail.get("read", 0))

    def submit_write(self, offset: int, length: int, buf: memoryview, done,
                     fua: bool = False) -> None:
        self.calls.append(("write", offset, length))
        assert buf.nbytes == length
        self.disk[offset:offset + length] = buf
        self._later(done, self.fail.get("write", 0))

    def submit_delete(self, offset: int, length: int, done) -> None:
        self.calls.append(("delete", offset, length))
        self.disk[offset:offset + length] = bytes(length)
        self._later(done, self.fail.get("delete", 0))

    def submit_flush(self, done) -> None:
        self.calls.append(("flush",))
        self._later(done, self.fail.get("flush", 0))

    def frontend_exit(self, code: int) -> None:
        self.exits.append(code)
        self.exited.set()


@pytest.fixture
def frontend(gg, monkeypatch: pytest.MonkeyPatch):
    from hast.frontends import ggate

    monkeypatch.setattr(ggate, "load_module", lambda: None)
    mod, fake, path = gg
    made = []

    def make(**kw):
        primary = StandInPrimary(**kw)
        fe = ggate.GgateFrontend(primary, control_path=path)
        made.append(fe)
        return fe, primary

    yield mod, fake, make
    for fe in made:
        fe.stop()


def test_frontend_serves_every_command(frontend) -> None:
    mod, fake, make = frontend
    fe, primary = make()
    fe.start()
    assert fe.unit == 0 and fake.get_str("create.name") == "hast/test"
    assert fake.get("create.mediasize") == primary.datasize

    seq = fake.push(mod.BIO_WRITE, 4096, 8192, fill=0xC3)
    assert fake.wait(seq) == 0
    assert primary.disk[4096:12288] == b"\xc3" * 8192
    seq = fake.push(mod.BIO_READ, 4096, 8192)
    assert fake.wait(seq) == 0
    assert fake.data(seq, 8192) == b"\xc3" * 8192
    seq = fake.push(mod.BIO_DELETE, 4096, 4096)
    assert fake.wait(seq) == 0
    assert primary.disk[4096:8192] == bytes(4096)
    seq = fake.push(mod.BIO_FLUSH, 0, 0)
    assert fake.wait(seq) == 0
    seq = fake.push(mod.BIO_SPEEDUP, 0, 0)
    assert fake.wait(seq) == errno.EOPNOTSUPP
    assert primary.calls == [("write", 4096, 8192), ("read", 4096, 8192),
                             ("delete", 4096, 4096), ("flush",)]
    primary.fail["read"] = errno.EIO
    seq = fake.push(mod.BIO_READ, 0, 512)
    assert fake.wait(seq) == errno.EIO
    assert not primary.exits


def test_frontend_many_requests_in_flight(frontend) -> None:
    mod, fake, make = frontend
    fe, primary = make()
    fe.start()
    seqs = [fake.push(mod.BIO_WRITE, i * 4096, 4096, fill=i) for i in range(200)]
    assert all(fake.wait(s) == 0 for s in seqs)
    assert all(primary.disk[i * 4096] == i for i in range(200))
    assert fake.get("done.count") == 200 and fake.get("done.unknown") == 0


def test_frontend_splits_beyond_maxio(frontend) -> None:
    """maxio 16K, kernel requests of 64K: buffers grow, the primary sees 16K pieces."""
    mod, fake, make = frontend
    fe, primary = make(maxio=16384)
    fe.start()
    payload = 65536
    seq = fake.push(mod.BIO_WRITE, 32768, payload, fill=0x42)
    assert fake.wait(seq) == 0
    assert fake.get("enomem.count") == 1
    assert primary.calls == [("write", 32768 + i * 16384, 16384) for i in range(4)]
    assert primary.disk[32768:32768 + payload] == b"\x42" * payload
    primary.calls.clear()
    seq = fake.push(mod.BIO_READ, 32768, payload)
    assert fake.wait(seq) == 0
    assert fake.data(seq, payload) == b"\x42" * payload
    assert primary.calls == [("read", 32768 + i * 16384, 16384) for i in range(4)]
    primary.fail["write"] = errno.ENOSPC
    seq = fake.push(mod.BIO_WRITE, 0, 40000 // 512 * 512, fill=1)
    assert fake.wait(seq) == errno.ENOSPC   # one failed piece fails the request


def test_frontend_takes_over_existing_device(frontend) -> None:
    """CREATE says EEXIST: CANCEL by name adopts the unit and re-serves what the dead
    worker had taken."""
    mod, fake, make = frontend
    fake.set_existing("hast/test", 3)
    taken = fake.push(mod.BIO_WRITE, 0, 4096, fill=0x99, handed_out=True)
    fe, primary = make()
    fe.start()
    assert fe.unit == 3 and fake.get("cancel.count") == 1
    assert fake.wait(taken) == 0
    assert primary.disk[:4096] == b"\x99" * 4096


def test_frontend_create_failure(frontend) -> None:
    mod, fake, make = frontend
    fe, primary = make(datasize=1000)       # not a multiple of the sector size: EINVAL
    with pytest.raises(OSError) as info:
        fe.start()
    assert info.value.errno == errno.EINVAL
    assert fe.thread is None


def test_frontend_stop_destroys(frontend) -> None:
    mod, fake, make = frontend
    fe, primary = make()
    fe.start()
    thread = fe.thread
    fe.stop()
    assert fake.get("destroy.count") == 1 and fake.get("destroy.force") == 1
    assert not thread.is_alive()
    seq = fake.push(mod.BIO_READ, 0, 512)   # nobody serves it any more
    assert fake.get("queued") == 1
    assert fake.lib.fake_wait(seq, 200) == -1
    assert not primary.exits


def test_frontend_exits_when_device_destroyed_elsewhere(frontend) -> None:
    mod, fake, make = frontend
    fe, primary = make()
    fe.start()
    fake.wait_sleeping()
    fake.destroy_now()
    assert primary.exited.wait(5)
    assert primary.exits == [0]             # hastd: "Received cancel", EX_OK


def test_frontend_direct_reads_hook(frontend) -> None:
    mod, fake, make = frontend
    fe, primary = make()
    assert fe.ggate_direct_reads(True) is False     # not started: nothing to modify
    fe.start()
    assert fe.ggate_direct_reads(True) is True
    assert fake.get("modify.mask") == 0x0C
    assert fake.get_str("modify.readprov") == "/dev/ada0p1"
    assert fake.get("modify.readoffset") == primary.localoff
    primary.res.local = "/nonexistent/image"
    assert fe.ggate_direct_reads(True) is False     # a warning, the device keeps working
    seq = fake.push(mod.BIO_FLUSH, 0, 0)
    assert fake.wait(seq) == 0


def test_load_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """modfind("g_gate"), else kldload("geom_gate") and modfind again; EEXIST is success."""
    from hast.frontends import ggate

    class Lib:
        def __init__(self, loaded: bool, kld_errno: int = 0) -> None:
            self.loaded, self.kld_errno, self.calls = loaded, kld_errno, []

        def modfind(self, name: bytes) -> int:
            self.calls.append(("modfind", name))
            return 7 if self.loaded else -1

        def kldload(self, name: bytes) -> int:
            self.calls.append(("kldload", name))
            if self.kld_errno:
                ffi.errno = self.kld_errno
                return -1
            self.loaded = True
            return 1

    ffi = types.SimpleNamespace(errno=0)
    for lib, ok, calls in [
        (Lib(True), True, [("modfind", b"g_gate")]),
        (Lib(False), True, [("modfind", b"g_gate"), ("kldload", b"geom_gate"),
                            ("modfind", b"g_gate")]),
        (Lib(False, errno.EEXIST), True, [("modfind", b"g_gate"), ("kldload", b"geom_gate")]),
        (Lib(False, errno.ENOENT), False, [("modfind", b"g_gate"), ("kldload", b"geom_gate")]),
    ]:
        monkeypatch.setitem(sys.modules, "hast._os", types.SimpleNamespace(ffi=ffi, lib=lib))
        if ok:
            ggate.load_module()
        else:
            with pytest.raises(OSError) as info:
                ggate.load_module()
            assert info.value.errno == errno.ENOENT
        assert lib.calls == calls


@pytest.mark.skipif(not FREEBSD, reason="the real hast._ggate exists on FreeBSD only")
def test_freebsd_build_imports() -> None:
    from hast import _ggate

    assert _ggate.CTL_PATH == "/dev/ggctl" and _ggate.VERSION == 3
