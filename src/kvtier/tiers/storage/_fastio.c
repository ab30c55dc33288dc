/*
 * The storage tier's record I/O: a store chunk's runs of adjacent slots written, or a load
 * chunk's runs read, in one call that runs without Python's GIL (it is called through ctypes,
 * which lets the GIL go for the whole call).
 *
 * Written in Python, sealing and writing a run of records lets the GIL go and takes it back
 * once per record (each payload checksum) and once more for the pwritev; on a small machine
 * under load, every take-back waits for the threads in line before it. Here a chunk of several
 * runs costs one. A load chunk's reads can also be started here and waited for in a second
 * call (kvt_batch_*, Linux native AIO), so that a thread checks one chunk while the next is read.
 *
 * The header built here is byte for byte the one kvtier.format.record.pack_header builds
 * (padded to hdr_len), with the slab's write sequence and its check in the last 16 bytes
 * (see kvtier.tiers.storage.slab); the tests compare the two. Layout (little-endian):
 *
 *   [0, 40)   prefix: magic, version, flags, lengths, namespace (from header_prefix)
 *   [40, 48)  payload checksum: hash(payload)
 *   [48, 56)  header checksum: hash(bytes [0, 48) followed by the key)
 *   [56, ..)  key, then zeros up to hdr_len - 16
 *   [hdr_len - 16, hdr_len - 8)  write sequence
 *   [hdr_len - 8, hdr_len)       hash(sequence followed by the key)
 *
 * The hash is passed in as a function pointer (xxh3-64 as the xxhash package exports it), so
 * this file carries no hash of its own and cannot disagree with the Python side about it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef uint64_t (*kvt_hash64)(const void *data, size_t len);

#define KVT_MAX_RECORDS 64    /* records per call (two iovecs each) */
#define KVT_MAX_HEADER 4096   /* bytes of one header */
#define KVT_PREFIX 40
#define KVT_FIXED 48
#define KVT_KEY_AT 56

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* The 2n iovecs of n (header, payload) pairs, headers hdr_len bytes apart from hdr. */
static void fill_iov(struct iovec *iov, int n, uint8_t *hdr, size_t hdr_len,
                     uint8_t *const *payloads, size_t payload_len) {
    for (int i = 0; i < n; i++) {
        iov[2 * i].iov_base = hdr + (size_t)i * hdr_len;
        iov[2 * i].iov_len = hdr_len;
        iov[2 * i + 1].iov_base = payloads[i];
        iov[2 * i + 1].iov_len = payload_len;
    }
}

/* One pwritev (write) or preadv of n (header, payload) pairs at offset, headers hdr_len bytes
 * apart from hdr: the bytes moved, or -errno. */
static int64_t run_io(int write, int fd, int64_t offset, int n, uint8_t *hdr, size_t hdr_len,
                      uint8_t *const *payloads, size_t payload_len) {
    struct iovec iov[2 * KVT_MAX_RECORDS];
    fill_iov(iov, n, hdr, hdr_len, payloads, payload_len);
    ssize_t done;
    do {
        done = write ? pwritev(fd, iov, 2 * n, (off_t)offset) : preadv(fd, iov, 2 * n, (off_t)offset);
    } while (done < 0 && errno == EINTR);
    return done < 0 ? -(int64_t)errno : (int64_t)done;
}

/* The records of n_runs runs of counts[r] records each, or -1 when a count is not positive or
 * the runs hold more than KVT_MAX_RECORDS records in all. */
static int total_records(int n_runs, const int *counts) {
    int total = 0;
    if (n_runs <= 0) return -1;
    for (int r = 0; r < n_runs; r++) {
        if (counts[r] <= 0 || counts[r] > KVT_MAX_RECORDS - total) return -1;
        total += counts[r];
    }
    return total;
}

/* Build the headers of n records in hdr, hdr_len bytes each (the caller checked the lengths). */
static void seal(kvt_hash64 hash, int n, uint8_t *hdr, size_t hdr_len, const uint8_t *prefix,
                 const uint8_t *const *keys, const size_t *key_lens, const uint64_t *seqs,
                 uint8_t *const *payloads, size_t payload_len) {
    uint8_t tmp[KVT_MAX_HEADER + 8];
    for (int i = 0; i < n; i++) {
        uint8_t *h = hdr + (size_t)i * hdr_len;
        const uint8_t *key = keys[i];
        size_t klen = key_lens[i];
        memset(h, 0, hdr_len);
        memcpy(h, prefix, KVT_PREFIX);
        put_le64(h + KVT_PREFIX, hash(payloads[i], payload_len));
        memcpy(h + KVT_KEY_AT, key, klen);
        memcpy(tmp, h, KVT_FIXED);
        memcpy(tmp + KVT_FIXED, key, klen);
        put_le64(h + KVT_FIXED, hash(tmp, KVT_FIXED + klen));
        put_le64(tmp, seqs[i]);
        memcpy(tmp + 8, key, klen);
        put_le64(h + hdr_len - 16, seqs[i]);
        put_le64(h + hdr_len - 8, hash(tmp, 8 + klen));
    }
}

/*
 * Write n_runs runs of records, in order: run r is counts[r] records written with one pwritev
 * at offsets[r] of fds[r]. The records (keys, key_lens, seqs, payloads) are numbered across the
 * runs, and so are their headers, built in hdr (hdr_len bytes each) just before their run is
 * written. done[r] is the bytes run r wrote, or -errno; a failed run does not stop the next.
 * Returns 0, or -EINVAL for arguments this function does not take (nothing was written: the
 * caller then writes the records itself).
 *
 * One call writes a whole store chunk, so a thread moves from one run's write to the next
 * without taking the GIL back in between.
 */
int64_t kvt_seal_write_runs(kvt_hash64 hash, int n_runs, const int *fds, const int64_t *offsets,
                            const int *counts, uint8_t *hdr, size_t hdr_len,
                            const uint8_t *prefix, const uint8_t *const *keys,
                            const size_t *key_lens, const uint64_t *seqs,
                            uint8_t *const *payloads, size_t payload_len, int64_t *done) {
    int total = total_records(n_runs, counts);
    if (total < 0 || hdr_len > KVT_MAX_HEADER) return -EINVAL;
    for (int i = 0; i < total; i++)
        if (KVT_KEY_AT + key_lens[i] + 16 > hdr_len) return -EINVAL;
    int first = 0;
    for (int r = 0; r < n_runs; r++) {
        int n = counts[r];
        uint8_t *h = hdr + (size_t)first * hdr_len;
        seal(hash, n, h, hdr_len, prefix, keys + first, key_lens + first, seqs + first,
             payloads + first, payload_len);
        done[r] = run_io(1, fds[r], offsets[r], n, h, hdr_len, payloads + first, payload_len);
        first += n;
    }
    return 0;
}

/* The payloads of the records of n_runs runs read whole (got[r] bytes each, records stride
 * bytes apart in the file) hashed into sums[], numbered across the runs. */
static void hash_runs(kvt_hash64 hash, int n_runs, const int *counts, const int64_t *got,
                      uint8_t *const *payloads, size_t payload_len, size_t stride, uint64_t *sums) {
    int first = 0;
    for (int r = 0; r < n_runs; r++) {
        if (got[r] > 0) {
            size_t whole = (size_t)got[r] / stride;
            for (size_t i = 0; i < whole && i < (size_t)counts[r]; i++)
                sums[first + i] = hash(payloads[first + i], payload_len);
        }
        first += counts[r];
    }
}

/*
 * Read n_runs runs of records, one preadv each, in order: run r is counts[r] records at
 * offsets[r] of fds[r]. The records' headers go to hdr, hdr_len bytes apart, and their payloads
 * to payloads[], both numbered across the runs (run r's first record is the sum of the counts
 * before it). got[r] is the bytes run r read, or -errno; a failed run does not stop the next.
 * The payload of every record read whole (stride bytes per record in the file) is hashed into
 * sums[] at its number. The caller checks the headers and compares sums with the payload
 * checksums they carry. Returns 0, or -EINVAL for arguments this function does not take
 * (nothing was read: the caller then reads the runs itself).
 *
 * One call reads a whole load chunk, so a thread moves from one run's read to the next
 * without taking the GIL back in between.
 */
int64_t kvt_read_runs(kvt_hash64 hash, int n_runs, const int *fds, const int64_t *offsets,
                      const int *counts, uint8_t *hdr, size_t hdr_len, uint8_t *const *payloads,
                      size_t payload_len, size_t stride, uint64_t *sums, int64_t *got) {
    if (total_records(n_runs, counts) < 0 || stride == 0) return -EINVAL;
    int first = 0;
    for (int r = 0; r < n_runs; r++) {
        got[r] = run_io(0, fds[r], offsets[r], counts[r], hdr + (size_t)first * hdr_len, hdr_len,
                        payloads + first, payload_len);
        first += counts[r];
    }
    hash_runs(hash, n_runs, counts, got, payloads, payload_len, stride, sums);
    return 0;
}

/*
 * A load chunk's reads in flight without a thread waiting on each: the runs of kvt_read_runs
 * submitted together with Linux native AIO (io_submit; asynchronous for O_DIRECT files), so a
 * thread can start a chunk's reads, then check the chunk before it (with the GIL) while the
 * disk works, then wait. One batch is in flight at a time; a thread keeps two. The batch keeps
 * copies of every argument it needs until its wait ends; the caller keeps the buffers (hdr,
 * payloads) alive and unchanged until then.
 */
enum { RUN_DONE = 0, RUN_SUBMITTED = 1, RUN_SYNC = 2 };

typedef struct {
    aio_context_t ctx;
    int n_runs, in_flight, busy;
    int fds[KVT_MAX_RECORDS], counts[KVT_MAX_RECORDS], state[KVT_MAX_RECORDS];
    int64_t offsets[KVT_MAX_RECORDS], got[KVT_MAX_RECORDS];
    uint8_t *hdr;
    size_t hdr_len, payload_len, stride;
    uint8_t *payloads[KVT_MAX_RECORDS];
    struct iovec iov[2 * KVT_MAX_RECORDS];
    struct iocb cbs[KVT_MAX_RECORDS];
    struct iocb *ptrs[KVT_MAX_RECORDS];
} kvt_batch;

/* A new batch with its own AIO context, or NULL (errno set: ENOSYS where the kernel has no
 * native AIO, EAGAIN where fs.aio-max-nr is used up). */
void *kvt_batch_new(void) {
    kvt_batch *b = calloc(1, sizeof(kvt_batch));
    if (b == NULL) return NULL;
    if (syscall(SYS_io_setup, KVT_MAX_RECORDS, &b->ctx) != 0) {
        int e = errno;
        free(b);
        errno = e;
        return NULL;
    }
    return b;
}

/* Wait for every read of b in flight; a run whose completion cannot be had gets -err. */
static void drain(kvt_batch *b) {
    struct io_event ev[KVT_MAX_RECORDS];
    while (b->in_flight > 0) {
        long n = syscall(SYS_io_getevents, b->ctx, 1, (long)b->in_flight, ev, NULL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {  /* not expected: the context is ours and valid; give the runs up */
            int e = n < 0 ? errno : EIO;
            for (int r = 0; r < b->n_runs; r++)
                if (b->state[r] == RUN_SUBMITTED) {
                    b->got[r] = -e;
                    b->state[r] = RUN_DONE;
                }
            b->in_flight = 0;
            return;
        }
        for (long i = 0; i < n; i++) {
            int r = (int)ev[i].data;
            if (r < 0 || r >= b->n_runs || b->state[r] != RUN_SUBMITTED) continue;
            b->got[r] = ev[i].res;  /* bytes read, or -errno */
            b->state[r] = RUN_DONE;
            b->in_flight--;
        }
    }
}

/*
 * Start reading n_runs runs as kvt_read_runs reads them (same arguments but the hash and the
 * outputs). Runs with fd < 0 fail with -EBADF; a run the kernel does not take now is read
 * synchronously by kvt_batch_wait. Returns the runs in flight, -EBUSY while the batch's last
 * reads have not been waited for, or -EINVAL for arguments this function does not take
 * (nothing was started).
 */
int64_t kvt_batch_read(void *handle, int n_runs, const int *fds, const int64_t *offsets,
                       const int *counts, uint8_t *hdr, size_t hdr_len, uint8_t *const *payloads,
                       size_t payload_len, size_t stride) {
    kvt_batch *b = handle;
    if (b->busy) return -EBUSY;
    int total = total_records(n_runs, counts);
    if (total < 0 || stride == 0) return -EINVAL;
    b->n_runs = n_runs;
    b->hdr = hdr;
    b->hdr_len = hdr_len;
    b->payload_len = payload_len;
    b->stride = stride;
    memcpy(b->payloads, payloads, (size_t)total * sizeof(uint8_t *));
    int first = 0, n_submit = 0;
    for (int r = 0; r < n_runs; r++) {
        int n = counts[r];
        b->fds[r] = fds[r];
        b->offsets[r] = offsets[r];
        b->counts[r] = n;
        b->got[r] = 0;
        fill_iov(b->iov + 2 * first, n, hdr + (size_t)first * hdr_len, hdr_len, payloads + first,
                 payload_len);
        if (fds[r] < 0) {
            b->got[r] = -EBADF;
            b->state[r] = RUN_DONE;
        } else {
            struct iocb *cb = &b->cbs[n_submit];
            memset(cb, 0, sizeof(*cb));
            cb->aio_data = (uint64_t)r;
            cb->aio_lio_opcode = IOCB_CMD_PREADV;
            cb->aio_fildes = (uint32_t)fds[r];
            cb->aio_buf = (uint64_t)(uintptr_t)&b->iov[2 * first];
            cb->aio_nbytes = (uint64_t)(2 * n);
            cb->aio_offset = offsets[r];
            b->ptrs[n_submit++] = cb;
            b->state[r] = RUN_SYNC;  /* until the kernel takes it */
        }
        first += n;
    }
    b->busy = 1;
    b->in_flight = 0;
    int done = 0;
    while (done < n_submit) {
        long k = syscall(SYS_io_submit, b->ctx, (long)(n_submit - done), b->ptrs + done);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;  /* the rest are read at the wait */
        for (long i = 0; i < k; i++) b->state[(int)b->ptrs[done + i]->aio_data] = RUN_SUBMITTED;
        done += (int)k;
        b->in_flight += (int)k;
    }
    return done;
}

/*
 * Wait for the batch's reads (and do those the kernel did not take), then hash the payloads
 * of every record read whole into sums[] as kvt_read_runs does; got[r] is the bytes run r read,
 * or -errno. Returns 0, or -EINVAL when no reads were started.
 */
int64_t kvt_batch_wait(void *handle, kvt_hash64 hash, uint64_t *sums, int64_t *got) {
    kvt_batch *b = handle;
    if (!b->busy) return -EINVAL;
    int first = 0;
    for (int r = 0; r < b->n_runs; r++) {
        if (b->state[r] == RUN_SYNC) {
            b->got[r] = run_io(0, b->fds[r], b->offsets[r], b->counts[r],
                               b->hdr + (size_t)first * b->hdr_len, b->hdr_len,
                               b->payloads + first, b->payload_len);
            b->state[r] = RUN_DONE;
        }
        first += b->counts[r];
    }
    drain(b);
    hash_runs(hash, b->n_runs, b->counts, b->got, b->payloads, b->payload_len, b->stride, sums);
    memcpy(got, b->got, (size_t)b->n_runs * sizeof(int64_t));
    b->busy = 0;
    return 0;
}

/* Free a batch (after waiting for whatever it still has in flight). */
void kvt_batch_free(void *handle) {
    kvt_batch *b = handle;
    if (b == NULL) return;
    drain(b);
    syscall(SYS_io_destroy, b->ctx);
    free(b);
}

/* Importable as a module too (it holds nothing callable from Python: see fastio.py). */
static struct PyModuleDef kvt_module = {
    PyModuleDef_HEAD_INIT, "_fastio",
    "Record I/O of the storage tier without the GIL; loaded with ctypes by fastio.py.", -1,
    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastio(void) { return PyModule_Create(&kvt_module); }
