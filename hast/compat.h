/*
 * compat.h: the one place py-hast's Cython modules meet OS headers.
 *
 * hastd talks to its local component through a handful of platform-specific calls: the
 * provider geometry (FreeBSD DIOCGMEDIASIZE/DIOCGSECTORSIZE, Linux BLKGETSIZE64/BLKSSZGET),
 * cache flush (DIOCGFLUSH / fdatasync), TRIM (DIOCGDELETE / BLKDISCARD, hole punching for
 * regular files) and O_DIRECT.  Each is wrapped here in a small static function with one
 * contract on every platform: 0 (or a value) on success, -1 with errno set on failure, and
 * errno EOPNOTSUPP where the platform has no such operation.  The .pyx files therefore
 * compile unchanged on Linux and FreeBSD and never include a system header themselves.
 */
#ifndef HAST_COMPAT_H
#define HAST_COMPAT_H

/* Python.h (always included first by Cython) already defines it on Linux. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include <sys/types.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <linux/fs.h>
#include <linux/falloc.h>
#elif defined(__FreeBSD__)
#include <sys/disk.h>
#endif

#ifndef EOPNOTSUPP
#define EOPNOTSUPP ENOTSUP
#endif

#ifdef IOV_MAX
#define HAST_IOV_MAX IOV_MAX
#else
#define HAST_IOV_MAX 1024
#endif

/* O_DIRECT is a hint on FreeBSD and a hard alignment contract on Linux; 0 elsewhere. */
#ifdef O_DIRECT
#define HAST_O_DIRECT O_DIRECT
#else
#define HAST_O_DIRECT 0
#endif

#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

/*
 * errno for "neither GEOM provider nor regular file": hastd uses EFTYPE; Linux has no
 * EFTYPE, ENOTBLK says the same thing there.
 */
#if defined(EFTYPE)
#define HAST_ENOTPROVIDER EFTYPE
#elif defined(ENOTBLK)
#define HAST_ENOTPROVIDER ENOTBLK
#else
#define HAST_ENOTPROVIDER EINVAL
#endif

/* A "disk" is what carries sector geometry: block devices on Linux, GEOM (character) on FreeBSD. */
static inline int
hast_is_disk(mode_t mode)
{
#if defined(__linux__)
	return (S_ISBLK(mode));
#elif defined(__FreeBSD__)
	return (S_ISCHR(mode));
#else
	(void)mode;
	return (0);
#endif
}

static inline int
hast_is_regular(mode_t mode)
{
	return (S_ISREG(mode));
}

static inline int
hast_disk_mediasize(int fd, uint64_t *sizep)
{
#if defined(__linux__)
	return (ioctl(fd, BLKGETSIZE64, sizep));
#elif defined(__FreeBSD__)
	off_t size;

	if (ioctl(fd, DIOCGMEDIASIZE, &size) == -1)
		return (-1);
	*sizep = (uint64_t)size;
	return (0);
#else
	(void)fd; (void)sizep;
	errno = EOPNOTSUPP;
	return (-1);
#endif
}

static inline int
hast_disk_sectorsize(int fd, unsigned int *sizep)
{
#if defined(__linux__)
	int ssize;

	if (ioctl(fd, BLKSSZGET, &ssize) == -1)
		return (-1);
	*sizep = (unsigned int)ssize;
	return (0);
#elif defined(__FreeBSD__)
	u_int ssize;

	if (ioctl(fd, DIOCGSECTORSIZE, &ssize) == -1)
		return (-1);
	*sizep = ssize;
	return (0);
#else
	(void)fd; (void)sizep;
	errno = EOPNOTSUPP;
	return (-1);
#endif
}

/*
 * Write-cache flush of a disk.  Linux's BLKFLSBUF only drops the buffer cache; fdatasync on
 * a block device is what sends the FLUSH to the device.
 */
static inline int
hast_disk_flush(int fd)
{
#if defined(__linux__)
	return (fdatasync(fd));
#elif defined(__FreeBSD__)
	return (ioctl(fd, DIOCGFLUSH, NULL));
#else
	(void)fd;
	errno = EOPNOTSUPP;
	return (-1);
#endif
}

static inline int
hast_file_flush(int fd)
{
#if defined(__linux__) || defined(__FreeBSD__)
	return (fdatasync(fd));
#else
	return (fsync(fd));
#endif
}

static inline int
hast_disk_delete(int fd, uint64_t offset, uint64_t length)
{
#if defined(__linux__)
	uint64_t range[2];

	range[0] = offset;
	range[1] = length;
	return (ioctl(fd, BLKDISCARD, range));
#elif defined(__FreeBSD__)
	off_t range[2];

	range[0] = (off_t)offset;
	range[1] = (off_t)length;
	return (ioctl(fd, DIOCGDELETE, range));
#else
	(void)fd; (void)offset; (void)length;
	errno = EOPNOTSUPP;
	return (-1);
#endif
}

/* Deallocate a range of a regular file; reads of it return zeros, the size is unchanged. */
static inline int
hast_file_punch(int fd, uint64_t offset, uint64_t length)
{
#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE)
	return (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset,
	    (off_t)length));
#elif defined(__FreeBSD__) && defined(SPACECTL_DEALLOC)
	struct spacectl_range range;

	range.r_offset = (off_t)offset;
	range.r_len = (off_t)length;
	/* fspacectl may do part of the work per call; loop until the range is empty. */
	while (range.r_len > 0) {
		if (fspacectl(fd, SPACECTL_DEALLOC, &range, 0, &range) == -1)
			return (-1);
	}
	return (0);
#else
	(void)fd; (void)offset; (void)length;
	errno = EOPNOTSUPP;
	return (-1);
#endif
}

static inline int
hast_fd_is_direct(int fd)
{
#if HAST_O_DIRECT != 0
	int flags = fcntl(fd, F_GETFL);

	return (flags != -1 && (flags & HAST_O_DIRECT) != 0);
#else
	(void)fd;
	return (0);
#endif
}

/*
 * A second, buffered open file description of the same file as fd (Linux: via
 * /proc/self/fd).  Used only when an O_DIRECT transfer has an offset or length the device
 * refuses; other platforms do not need it (FreeBSD's O_DIRECT has no alignment rule).
 */
static inline int
hast_reopen_buffered(int fd)
{
#if defined(__linux__) && HAST_O_DIRECT != 0
	char path[64];
	int flags;

	flags = fcntl(fd, F_GETFL);
	if (flags == -1)
		return (-1);
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	return (open(path, (flags & O_ACCMODE) | O_CLOEXEC));
#else
	(void)fd;
	errno = EOPNOTSUPP;
	return (-1);
#endif
}

#endif /* !HAST_COMPAT_H */
