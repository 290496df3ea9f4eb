/*
 * trenvx: loaded into QEMU (LD_PRELOAD) so that a sandbox giving memory back never writes to the
 * template it was restored from.
 *
 * A sandbox maps its template's guest RAM file privately (MAP_PRIVATE, copy-on-write). When the
 * guest reports free pages (virtio-balloon free page reporting), QEMU 7.2 discards them with
 * ram_block_discard_range(), which for a file-backed RAM block first punches a hole in the *file*
 * (fallocate(FALLOC_FL_PUNCH_HOLE)) and then drops its own copy (madvise(MADV_DONTNEED)). For a
 * private mapping the first step is wrong: it zeroes the template for every other sandbox.
 * (QEMU 8.x and later no longer punch the file of a private mapping.)
 *
 * Published template files are read-only (mode 0444), but QEMU runs as root and opens them
 * read-write. Here a hole punch into a regular file without any write permission bit does
 * nothing and reports success, so QEMU goes on to madvise(MADV_DONTNEED): the sandbox's private
 * copy of the page is freed and the page reads from the template file again. Every other call
 * goes to the C library.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/types.h>

static int keep(int fd, int mode)
{
	struct stat st;

	if (!(mode & FALLOC_FL_PUNCH_HOLE))
		return 0;
	if (fstat(fd, &st) != 0)
		return 0;
	return S_ISREG(st.st_mode) && (st.st_mode & (S_IWUSR | S_IWGRP | S_IWOTH)) == 0;
}

typedef int (*fallocate_fn)(int, int, off_t, off_t);

static int call_next(const char *name, int fd, int mode, off_t offset, off_t len)
{
	fallocate_fn next = (fallocate_fn)dlsym(RTLD_NEXT, name);

	if (next == NULL) {
		errno = ENOSYS;
		return -1;
	}
	return next(fd, mode, offset, len);
}

int fallocate(int fd, int mode, off_t offset, off_t len)
{
	if (keep(fd, mode))
		return 0;
	return call_next("fallocate", fd, mode, offset, len);
}

int fallocate64(int fd, int mode, off_t offset, off_t len)
{
	if (keep(fd, mode))
		return 0;
	return call_next("fallocate64", fd, mode, offset, len);
}

/*
 * A jailed QEMU (trenvx.vmm.jail) runs as an unprivileged uid that may only read the template's
 * RAM file, but QEMU 7.2 opens a memory-backend-file read-write even for share=off. The file named
 * by TRENVX_PRIVATE_RAM (the one RAM file QEMU maps privately) is opened read-only instead: a
 * MAP_PRIVATE mapping never writes its file, and copy-on-write works on a read-only descriptor.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

typedef int (*open_fn)(const char *, int, ...);

static int private_ram(const char *path, int flags)
{
	const char *ram = getenv("TRENVX_PRIVATE_RAM");

	return ram != NULL && path != NULL && (flags & O_ACCMODE) == O_RDWR && strcmp(ram, path) == 0;
}

static int open_next(const char *name, const char *path, int flags, mode_t mode)
{
	open_fn next = (open_fn)dlsym(RTLD_NEXT, name);

	if (next == NULL) {
		errno = ENOSYS;
		return -1;
	}
	if (private_ram(path, flags))
		flags = (flags & ~O_ACCMODE) | O_RDONLY;
	return next(path, flags, mode);
}

int open(const char *path, int flags, ...)
{
	mode_t mode = 0;

	if (flags & (O_CREAT | O_TMPFILE)) {
		va_list ap;
		va_start(ap, flags);
		mode = va_arg(ap, mode_t);
		va_end(ap);
	}
	return open_next("open", path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;

	if (flags & (O_CREAT | O_TMPFILE)) {
		va_list ap;
		va_start(ap, flags);
		mode = va_arg(ap, mode_t);
		va_end(ap);
	}
	return open_next("open64", path, flags, mode);
}

/* The same for the fortified entry points (_FORTIFY_SOURCE: open with flags not known at compile
 * time and no mode; QEMU's memory backend calls this one). */
typedef int (*open2_fn)(const char *, int);

static int open2_next(const char *name, const char *path, int flags)
{
	open2_fn next = (open2_fn)dlsym(RTLD_NEXT, name);

	if (next == NULL) {
		errno = ENOSYS;
		return -1;
	}
	if (private_ram(path, flags))
		flags = (flags & ~O_ACCMODE) | O_RDONLY;
	return next(path, flags);
}

int __open_2(const char *path, int flags)
{
	return open2_next("__open_2", path, flags);
}

int __open64_2(const char *path, int flags)
{
	return open2_next("__open64_2", path, flags);
}
