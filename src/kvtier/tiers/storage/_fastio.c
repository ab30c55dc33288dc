/*
 * The storage tier's record I/O: a store chunk's runs of adjacent slots written, or a load
 * chunk's runs read, in one call that runs without Python's GIL (it is called through ctypes,
 * which lets the GIL go for the whole call).
 *
 * Written in Python, sealing and writing a run of records lets the GIL go and takes it back
 * once per record (each payload checksum) and once more for the pwritev; on a small machine
 * under load, every take-back waits for the threads in line before it. Here a chunk of several
 * runs costs one. Load chunks can also be queued to native threads that read them (kvt_engine_*)
 * and handed back once read, so that no read waits for the GIL to be started.
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
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

typedef uint64_t (*kvt_hash64)(const void *data, size_t len);

#define KVT_MAX_RECORDS 64    /* records per call (two iovecs each) */
#define KVT_MAX_HEADER 4096   /* bytes of one header */
#define KVT_PREFIX 40
#define KVT_FIXED 48
#define KVT_KEY_AT 56

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* One pwritev (write) or preadv of n (header, payload) pairs at offset, headers hdr_len bytes
 * apart from hdr: the bytes moved, or -errno. */
static int64_t run_io(int write, int fd, int64_t offset, int n, uint8_t *hdr, size_t hdr_len,
                      uint8_t *const *payloads, size_t payload_len) {
    struct iovec iov[2 * KVT_MAX_RECORDS];
    for (int i = 0; i < n; i++) {
        iov[2 * i].iov_base = hdr + (size_t)i * hdr_len;
        iov[2 * i].iov_len = hdr_len;
        iov[2 * i + 1].iov_base = payloads[i];
        iov[2 * i + 1].iov_len = payload_len;
    }
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
        int n = counts[r];
        got[r] = run_io(0, fds[r], offsets[r], n, hdr + (size_t)first * hdr_len, hdr_len,
                        payloads + first, payload_len);
        if (got[r] > 0) {
            size_t whole = (size_t)got[r] / stride;
            for (size_t i = 0; i < whole && i < (size_t)n; i++)
                sums[first + i] = hash(payloads[first + i], payload_len);
        }
        first += n;
    }
    return 0;
}

/*
 * A read engine: native threads that read load chunks queued by kvt_engine_submit, each as
 * kvt_read_runs reads it, and a list of the chunks whose reads ended, taken by
 * kvt_engine_reap. No step of a chunk's read waits for the GIL, so the disk keeps a read a
 * thread in flight while the Python side, which needs the GIL to check what was read, is
 * slow to run (a busy or oversubscribed host). A chunk is a kvt_job the caller made with
 * kvt_job_new; it keeps copies of the arguments, and the caller keeps the buffers (headers,
 * payloads, sums, got) alive and unchanged until the job comes back from kvt_engine_reap.
 * kvt_job_new, kvt_job_free, kvt_engine_submit, kvt_engine_wake, and kvt_engine_reap with a
 * timeout of 0, never wait for I/O or for a thread longer than a list's update under the
 * engine's lock: fastio.py calls them with the GIL held.
 */
#define KVT_MAX_THREADS 256
enum { JOB_IDLE = 0, JOB_QUEUED = 1, JOB_DONE = 2 };

typedef struct kvt_job {
    struct kvt_job *next;
    int state, n_runs;
    int fds[KVT_MAX_RECORDS], counts[KVT_MAX_RECORDS];
    int64_t offsets[KVT_MAX_RECORDS];
    uint8_t *hdr;
    uint8_t *payloads[KVT_MAX_RECORDS];
    size_t hdr_len, payload_len, stride;
    uint64_t *sums;
    int64_t *got;
} kvt_job;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t work;  /* the threads wait here for a queued job */
    pthread_cond_t done;  /* a reaper waits here for an ended one */
    kvt_job *queued, *queued_tail, *ended, *ended_tail;
    int stop, woken, n_threads;
    kvt_hash64 hash;
    pthread_t threads[KVT_MAX_THREADS];
} kvt_engine;

/* Append j to the list from *head to *tail (with the engine's lock held). */
static void push(kvt_job **head, kvt_job **tail, kvt_job *j) {
    j->next = NULL;
    if (*tail != NULL) (*tail)->next = j; else *head = j;
    *tail = j;
}

static void *engine_thread(void *arg) {
    kvt_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (e->queued == NULL && !e->stop) pthread_cond_wait(&e->work, &e->mu);
        kvt_job *j = e->queued;
        if (j == NULL) break;  /* stopping, and every queued job was read */
        e->queued = j->next;
        if (e->queued == NULL) e->queued_tail = NULL;
        pthread_mutex_unlock(&e->mu);
        kvt_read_runs(e->hash, j->n_runs, j->fds, j->offsets, j->counts, j->hdr, j->hdr_len,
                      j->payloads, j->payload_len, j->stride, j->sums, j->got);
        pthread_mutex_lock(&e->mu);
        j->state = JOB_DONE;
        push(&e->ended, &e->ended_tail, j);
        pthread_cond_broadcast(&e->done);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

/* Stop the engine's threads once every queued job is read, and free it. */
void kvt_engine_free(void *handle) {
    kvt_engine *e = handle;
    if (e == NULL) return;
    pthread_mutex_lock(&e->mu);
    e->stop = 1;
    pthread_cond_broadcast(&e->work);
    pthread_mutex_unlock(&e->mu);
    for (int i = 0; i < e->n_threads; i++) pthread_join(e->threads[i], NULL);
    pthread_cond_destroy(&e->work);
    pthread_cond_destroy(&e->done);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

/* A new engine of n_threads threads hashing with hash, or NULL (errno set). */
void *kvt_engine_new(kvt_hash64 hash, int n_threads) {
    if (n_threads <= 0 || n_threads > KVT_MAX_THREADS) {
        errno = EINVAL;
        return NULL;
    }
    kvt_engine *e = calloc(1, sizeof(kvt_engine));
    if (e == NULL) return NULL;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);  /* reap's timeout ignores clock steps */
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->work, NULL);
    pthread_cond_init(&e->done, &ca);
    pthread_condattr_destroy(&ca);
    e->hash = hash;
    for (int i = 0; i < n_threads; i++) {
        int rc = pthread_create(&e->threads[i], NULL, engine_thread, e);
        if (rc != 0) {
            kvt_engine_free(e);  /* stops and joins the threads made so far */
            errno = rc;
            return NULL;
        }
        e->n_threads = i + 1;
    }
    return e;
}

void *kvt_job_new(void) { return calloc(1, sizeof(kvt_job)); }

/* Free a job that is not queued or being read (never submitted, reaped, or its engine freed). */
void kvt_job_free(void *job) { free(job); }

/*
 * Queue job for reading n_runs runs as kvt_read_runs reads them (same arguments but the
 * hash); sums and got are filled as kvt_read_runs fills them by the time the job is reaped.
 * Returns 0, -EBUSY for a job submitted and not reaped yet, -ESHUTDOWN once the engine stops,
 * or -EINVAL for arguments this function does not take (nothing was queued).
 */
int64_t kvt_engine_submit(void *handle, void *job, int n_runs, const int *fds,
                          const int64_t *offsets, const int *counts, uint8_t *hdr,
                          size_t hdr_len, uint8_t *const *payloads, size_t payload_len,
                          size_t stride, uint64_t *sums, int64_t *got) {
    kvt_engine *e = handle;
    kvt_job *j = job;
    int total = total_records(n_runs, counts);
    if (total < 0 || stride == 0) return -EINVAL;
    pthread_mutex_lock(&e->mu);  /* the job's state changes under the engine's lock */
    if (j->state != JOB_IDLE || e->stop) {
        int busy = j->state != JOB_IDLE;
        pthread_mutex_unlock(&e->mu);
        return busy ? -EBUSY : -ESHUTDOWN;
    }
    j->n_runs = n_runs;
    memcpy(j->fds, fds, (size_t)n_runs * sizeof(int));
    memcpy(j->counts, counts, (size_t)n_runs * sizeof(int));
    memcpy(j->offsets, offsets, (size_t)n_runs * sizeof(int64_t));
    memcpy(j->payloads, payloads, (size_t)total * sizeof(uint8_t *));
    j->hdr = hdr;
    j->hdr_len = hdr_len;
    j->payload_len = payload_len;
    j->stride = stride;
    j->sums = sums;
    j->got = got;
    j->state = JOB_QUEUED;
    push(&e->queued, &e->queued_tail, j);
    pthread_cond_signal(&e->work);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/*
 * Take up to max jobs whose reads ended into out[] (they are the caller's again), waiting up
 * to timeout_us microseconds (a negative timeout: no limit) for the first, or until
 * kvt_engine_wake. Returns how many were taken.
 */
int64_t kvt_engine_reap(void *handle, void **out, int max, int64_t timeout_us) {
    kvt_engine *e = handle;
    pthread_mutex_lock(&e->mu);
    if (e->ended == NULL && !e->woken && timeout_us != 0) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        if (timeout_us > 0) {
            until.tv_sec += timeout_us / 1000000;
            until.tv_nsec += (timeout_us % 1000000) * 1000;
            if (until.tv_nsec >= 1000000000) {
                until.tv_sec += 1;
                until.tv_nsec -= 1000000000;
            }
        }
        while (e->ended == NULL && !e->woken) {
            int rc = timeout_us > 0 ? pthread_cond_timedwait(&e->done, &e->mu, &until)
                                    : pthread_cond_wait(&e->done, &e->mu);
            if (rc == ETIMEDOUT) break;
        }
    }
    e->woken = 0;
    int n = 0;
    while (e->ended != NULL && n < max) {
        kvt_job *j = e->ended;
        e->ended = j->next;
        j->next = NULL;
        j->state = JOB_IDLE;
        out[n++] = j;
    }
    if (e->ended == NULL) e->ended_tail = NULL;
    pthread_mutex_unlock(&e->mu);
    return n;
}

/* Make a waiting (or the next) kvt_engine_reap return at once. */
void kvt_engine_wake(void *handle) {
    kvt_engine *e = handle;
    pthread_mutex_lock(&e->mu);
    e->woken = 1;
    pthread_cond_broadcast(&e->done);
    pthread_mutex_unlock(&e->mu);
}

/* Importable as a module too (it holds nothing callable from Python: see fastio.py). */
static struct PyModuleDef kvt_module = {
    PyModuleDef_HEAD_INIT, "_fastio",
    "Record I/O of the storage tier without the GIL; loaded with ctypes by fastio.py.", -1,
    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastio(void) { return PyModule_Create(&kvt_module); }
