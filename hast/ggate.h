/*
 * ggate.h: py-hast's own declarations of FreeBSD's GEOM Gate userland interface.
 *
 * On FreeBSD the primary exposes /dev/hast/<name> through GEOM_GATE: it creates a gate
 * provider with ioctls on /dev/ggctl, then serves the kernel's requests with a
 * START/DONE ioctl loop (hast/_ggate.pyx).  FreeBSD's <geom/gate/g_gate.h> drags in kernel
 * headers and does not exist on Linux, where the layout tests (tests/test_ggate.py) compile
 * this file for amd64, i386 and arm64.  So the structures, constants and ioctl request
 * codes are written here from hast-internals §11, with explicit fixed-width types:
 *
 *   FreeBSD type   here            why
 *   u_int          unsigned int    32 bits on every FreeBSD platform
 *   int            int             32 bits
 *   uint32_t       uint32_t
 *   off_t          int64_t         64 bits on every FreeBSD platform (also ILP32 ones)
 *   uintptr_t      uintptr_t       pointer sized: 8 bytes on LP64, 4 on ILP32
 *   void *         void *
 *   NAME_MAX       255             <sys/syslimits.h>
 *
 * The compiler then lays the structures out by the platform's C ABI exactly as FreeBSD's
 * compiler does with the real header: on i386 a 64-bit integer inside a structure is only
 * 4-byte aligned (i386 SysV psABI), so the i386 structures lose the padding before the
 * off_t fields and are smaller; on amd64 and arm64 (LP64, 8-byte aligned int64) the layout
 * is the one of hast-internals §11.4.  The _Static_asserts at the end pin the sizes for the
 * three platforms py-hast supports on FreeBSD, so a wrong edit fails the FreeBSD build and
 * not the kernel's version check at run time.
 *
 * The first part (through the ioctl codes) needs only <stdint.h> and compiles freestanding;
 * define HAST_GGATE_ABI_ONLY to stop there (the cross-compiled layout tests do, as they have
 * no target C library).  The second part is the one place hast/_ggate.pyx meets OS headers.
 */
#ifndef HAST_GGATE_H
#define HAST_GGATE_H

#include <stdint.h>

/* -- names and limits ------------------------------------------------------------------ */

#define	G_GATE_CLASS_NAME	"GATE"
#define	G_GATE_CTL_NAME		"ggctl"		/* the control device, /dev/ggctl */
#define	G_GATE_CTL_PATH		"/dev/" G_GATE_CTL_NAME
/* What hastd asks modfind()/kldload() for before opening /dev/ggctl. */
#define	G_GATE_KLD_MODNAME	"g_gate"
#define	G_GATE_KLD_FILE		"geom_gate"

/* Every ioctl structure starts with it; the kernel answers EINVAL to anything else. */
#define	G_GATE_VERSION		3

#define	HAST_GG_NAME_MAX	255		/* FreeBSD's NAME_MAX */
#define	G_GATE_INFOSIZE		2048
#define	G_GATE_MAX_QUEUE_SIZE	4096		/* only when gctl_maxcount != 0 */

#define	G_GATE_FLAG_READONLY	0x0001
#define	G_GATE_FLAG_WRITEONLY	0x0002
#define	G_GATE_FLAG_DESTROY	0x1000		/* kernel internal */
#define	G_GATE_USERFLAGS	(G_GATE_FLAG_READONLY | G_GATE_FLAG_WRITEONLY)

#define	G_GATE_UNIT_AUTO	(-1)		/* kernel picks /dev/ggate<unit> */
#define	G_GATE_NAME_GIVEN	(-2)		/* gctl_name is the full provider name */

#define	GG_MODIFY_MEDIASIZE	0x01
#define	GG_MODIFY_INFO		0x02
#define	GG_MODIFY_READPROV	0x04
#define	GG_MODIFY_READOFFSET	0x08

/* gctl_cmd: FreeBSD's bio_cmd values (<sys/bio.h>) */
#define	HAST_BIO_READ		1
#define	HAST_BIO_WRITE		2
#define	HAST_BIO_DELETE		3
#define	HAST_BIO_GETATTR	4
#define	HAST_BIO_FLUSH		5
#define	HAST_BIO_CMD0		6
#define	HAST_BIO_CMD1		7
#define	HAST_BIO_CMD2		8
#define	HAST_BIO_ZONE		9
#define	HAST_BIO_SPEEDUP	10

/* -- structures (hast-internals §11.4) ------------------------------------------------- */

struct g_gate_ctl_create {
	unsigned int	gctl_version;
	int64_t		gctl_mediasize;
	unsigned int	gctl_sectorsize;
	unsigned int	gctl_flags;
	unsigned int	gctl_maxcount;
	unsigned int	gctl_timeout;		/* seconds; 0: no kernel guard */
	char		gctl_name[HAST_GG_NAME_MAX];
	char		gctl_info[G_GATE_INFOSIZE];
	char		gctl_readprov[HAST_GG_NAME_MAX];
	int64_t		gctl_readoffset;
	int		gctl_unit;		/* in/out */
};

struct g_gate_ctl_modify {
	unsigned int	gctl_version;
	int		gctl_unit;
	uint32_t	gctl_modify;		/* GG_MODIFY_* */
	int64_t		gctl_mediasize;
	char		gctl_info[G_GATE_INFOSIZE];
	char		gctl_readprov[HAST_GG_NAME_MAX];
	int64_t		gctl_readoffset;
};

struct g_gate_ctl_destroy {
	unsigned int	gctl_version;
	int		gctl_unit;
	int		gctl_force;
	char		gctl_name[HAST_GG_NAME_MAX];
};

struct g_gate_ctl_cancel {
	unsigned int	gctl_version;
	int		gctl_unit;
	uintptr_t	gctl_seq;		/* 0: every request handed to userland */
	char		gctl_name[HAST_GG_NAME_MAX];
};

struct g_gate_ctl_io {
	unsigned int	gctl_version;
	int		gctl_unit;
	uintptr_t	gctl_seq;
	unsigned int	gctl_cmd;		/* HAST_BIO_* */
	int64_t		gctl_offset;
	int64_t		gctl_length;		/* in: buffer size; out: request length */
	void		*gctl_data;
	int		gctl_error;
};

/* -- ioctl request codes: FreeBSD's <sys/ioccom.h> encoding ----------------------------- */

/*
 * Prefixed, so that they never collide with the system's own _IOC/_IOWR (Linux encodes
 * differently, and FreeBSD's <sys/ioccom.h> may be included by the OS part below).
 */
#define	HAST_IOCPARM_SHIFT	13
#define	HAST_IOCPARM_MASK	((1UL << HAST_IOCPARM_SHIFT) - 1)
#define	HAST_IOCPARM_MAX	(1UL << HAST_IOCPARM_SHIFT)
#define	HAST_IOC_VOID		0x20000000UL
#define	HAST_IOC_OUT		0x40000000UL
#define	HAST_IOC_IN		0x80000000UL
#define	HAST_IOC_INOUT		(HAST_IOC_IN | HAST_IOC_OUT)
#define	HAST_IOC(inout, group, num, len)				\
	((unsigned long)((inout) | (((unsigned long)(len) & HAST_IOCPARM_MASK) << 16) | \
	    ((unsigned long)(group) << 8) | (unsigned long)(num)))
#define	HAST_IOWR(g, n, t)	HAST_IOC(HAST_IOC_INOUT, (g), (n), sizeof(t))

#define	G_GATE_CMD_CREATE	HAST_IOWR('m', 0, struct g_gate_ctl_create)
#define	G_GATE_CMD_MODIFY	HAST_IOWR('m', 1, struct g_gate_ctl_modify)
#define	G_GATE_CMD_DESTROY	HAST_IOWR('m', 2, struct g_gate_ctl_destroy)
#define	G_GATE_CMD_CANCEL	HAST_IOWR('m', 3, struct g_gate_ctl_cancel)
#define	G_GATE_CMD_START	HAST_IOWR('m', 4, struct g_gate_ctl_io)
#define	G_GATE_CMD_DONE		HAST_IOWR('m', 5, struct g_gate_ctl_io)

/* The encoding keeps only 13 bits of the size: a larger structure would be silently wrong. */
_Static_assert(sizeof(struct g_gate_ctl_create) < HAST_IOCPARM_MAX, "create too large");
_Static_assert(sizeof(struct g_gate_ctl_modify) < HAST_IOCPARM_MAX, "modify too large");

/*
 * Sizes per platform (hast-internals §11.3 for LP64; ILP32 i386 derived in
 * tests/test_ggate.py).  Other platforms compile without this check.
 */
#if defined(__x86_64__) || defined(__aarch64__)
_Static_assert(sizeof(struct g_gate_ctl_create) == 2608, "g_gate_ctl_create layout");
_Static_assert(sizeof(struct g_gate_ctl_modify) == 2336, "g_gate_ctl_modify layout");
_Static_assert(sizeof(struct g_gate_ctl_destroy) == 268, "g_gate_ctl_destroy layout");
_Static_assert(sizeof(struct g_gate_ctl_cancel) == 272, "g_gate_ctl_cancel layout");
_Static_assert(sizeof(struct g_gate_ctl_io) == 56, "g_gate_ctl_io layout");
#elif defined(__i386__)
_Static_assert(sizeof(struct g_gate_ctl_create) == 2600, "g_gate_ctl_create layout");
_Static_assert(sizeof(struct g_gate_ctl_modify) == 2332, "g_gate_ctl_modify layout");
_Static_assert(sizeof(struct g_gate_ctl_destroy) == 268, "g_gate_ctl_destroy layout");
_Static_assert(sizeof(struct g_gate_ctl_cancel) == 268, "g_gate_ctl_cancel layout");
_Static_assert(sizeof(struct g_gate_ctl_io) == 40, "g_gate_ctl_io layout");
#endif

#ifndef HAST_GGATE_ABI_ONLY

/* -- the OS part: only what hast/_ggate.pyx calls --------------------------------------- */

#include <sys/types.h>
#include <sys/ioctl.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif
#ifndef ECANCELED
#define ECANCELED 85	/* FreeBSD's value; every platform we build on has it */
#endif

/* open(2) of the control device: read-write, never inherited by hook scripts. */
static inline int
hast_gg_open(const char *path)
{
	return (open(path, O_RDWR | O_CLOEXEC));
}

static inline int
hast_gg_close(int fd)
{
	return (close(fd));
}

/*
 * One ioctl on /dev/ggctl: 0, or the errno.  Returning the errno instead of reading the
 * global later keeps it correct when the call runs without the GIL.
 */
static inline int
hast_gg_ioctl(int fd, unsigned long request, void *arg)
{
	if (ioctl(fd, request, arg) == -1)
		return (errno);
	return (0);
}

#endif	/* !HAST_GGATE_ABI_ONLY */

#endif	/* !HAST_GGATE_H */
