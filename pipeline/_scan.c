/* Compiled FASTA chunk kernels for ingest (the optional fast path of pipeline.fasta,
 * pipeline.headers and pipeline.records; each has a numpy twin that defines the same result and
 * is used where this module was not built).
 *
 *   count_records(body)                                   -> records in the chunk
 *   count_newlines(body)                                  -> '\n' bytes in it
 *   split(body, hs, he, lines, offsets, residues)         -> (residues, newlines, odd)
 *   header_fields(data, start, end, acc_s, acc_e, db_e, desc_s, desc_e, taxid, flags) -> None
 *   gather(data, start, end, out)                         -> None
 *   byte_counts(data, counts)                             -> None
 *   md5_hex(data, offsets, out)                           -> None
 *   string_hashes(data, offsets, out)                     -> None
 *
 * Inputs are read-only buffers, outputs writable buffers the caller allocated (int64 arrays,
 * uint8 for bytes); each call checks the sizes and releases the GIL while it scans.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LOW_MASK 0x2121212121212121ULL /* bytes <= 32 (whitespace and control bytes) */
#define HIGH_BITS 0x8080808080808080ULL
#define MAX_WALK 19   /* runs of spaces/digits this long are left to the regex path */
#define MAX_DIGITS 18 /* longer taxids may overflow int64 */

enum { TAXID_VALID = 1, SLOW = 2 };

static int is_ws(uint8_t c) { return c == '\n' || c == '\r' || c == ' ' || c == '\t'; }

/* The first index >= p (< n) whose byte is <= 32, or n. */
static Py_ssize_t next_low(const uint8_t *b, Py_ssize_t p, Py_ssize_t n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (p + 8 <= n) {
        uint64_t x;
        memcpy(&x, b + p, 8);
        /* the lowest flagged byte is exactly the first byte < 0x21 */
        uint64_t t = (x - LOW_MASK) & ~x & HIGH_BITS;
        if (t) return p + (__builtin_ctzll(t) >> 3);
        p += 8;
    }
#endif
    while (p < n && b[p] > 32) p++;
    return p;
}

static int need(Py_buffer *buf, Py_ssize_t items, Py_ssize_t width, const char *name) {
    if (buf->len < items * width) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, %zd needed", name, buf->len,
                     items * width);
        return 0;
    }
    return 1;
}

/* Total bytes of the spans [start[i], end[i]) of a buffer of `limit` bytes, or -1 with a
 * ValueError set where one is reversed or out of range. */
static Py_ssize_t span_bytes(const int64_t *start, const int64_t *end, Py_ssize_t n,
                             Py_ssize_t limit, const char *name) {
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (start[i] < 0 || start[i] > end[i] || end[i] > limit) {
            PyErr_Format(PyExc_ValueError, "%s: span out of range (span %zd)", name, i);
            return -1;
        }
        total += end[i] - start[i];
    }
    return total;
}

static PyObject *count_records(PyObject *self, PyObject *args) {
    Py_buffer body;
    if (!PyArg_ParseTuple(args, "y*", &body)) return NULL;
    const uint8_t *b = body.buf;
    Py_ssize_t n = body.len, count = 1;
    Py_BEGIN_ALLOW_THREADS
    /* every '>' after a '\n': one memchr per record (a '\n' one stopped at every line) */
    const uint8_t *p = n > 1 ? b + 1 : b + n, *end = b + n;
    while (p < end && (p = memchr(p, '>', (size_t)(end - p))) != NULL) {
        if (p[-1] == '\n') count++;
        p++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&body);
    return PyLong_FromSsize_t(count);
}

/* Newlines in a buffer (the reader's line numbering): 16 bytes compared at a time into byte
 * counters (SSE2/NEON vectors where GCC/Clang build them), summed before they can overflow. */
#if defined(__GNUC__)
typedef uint8_t nl_vec __attribute__((vector_size(16)));

static Py_ssize_t newlines_in(const uint8_t *b, Py_ssize_t n) {
    Py_ssize_t count = 0, i = 0;
    nl_vec newline;
    memset(&newline, '\n', sizeof newline);
    while (i + 16 <= n) {
        nl_vec acc = {0};
        for (int round = 0; round < 255 && i + 16 <= n; round++, i += 16) {
            nl_vec v;
            memcpy(&v, b + i, 16);
            acc -= (nl_vec)(v == newline); /* a match is all ones: -1 */
        }
        uint8_t lanes[16];
        memcpy(lanes, &acc, 16);
        for (int k = 0; k < 16; k++) count += lanes[k];
    }
    for (; i < n; i++) count += b[i] == '\n';
    return count;
}
#else
static Py_ssize_t newlines_in(const uint8_t *b, Py_ssize_t n) {
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) count += b[i] == '\n';
    return count;
}
#endif

static PyObject *count_newlines(PyObject *self, PyObject *args) {
    Py_buffer body;
    if (!PyArg_ParseTuple(args, "y*", &body)) return NULL;
    Py_ssize_t count;
    Py_BEGIN_ALLOW_THREADS
    count = newlines_in(body.buf, body.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&body);
    return PyLong_FromSsize_t(count);
}

/* split_records' arrays: per record the header span (without '>', right-stripped of
 * "\r\n \t"), the newlines before it, and its sequence (lines joined, "\r\n \t" dropped) in
 * `residues` at offsets[i]:offsets[i+1]. Records start at 0 and after every "\n>". */
static PyObject *split(PyObject *self, PyObject *args) {
    Py_buffer body, hs_b, he_b, lines_b, off_b, res_b;
    if (!PyArg_ParseTuple(args, "y*w*w*w*w*w*", &body, &hs_b, &he_b, &lines_b, &off_b, &res_b))
        return NULL;
    PyObject *result = NULL;
    const uint8_t *b = body.buf;
    Py_ssize_t n = body.len, records = 0, k = 0, newlines = 0, capacity = hs_b.len / 8;
    int odd = 0, overflow = 0;
    if (!need(&he_b, capacity, 8, "he") || !need(&lines_b, capacity, 8, "lines") ||
        !need(&off_b, capacity + 1, 8, "offsets") || !need(&res_b, n, 1, "residues"))
        goto done;
    int64_t *hs = hs_b.buf, *he = he_b.buf, *lines = lines_b.buf, *off = off_b.buf;
    uint8_t *res = res_b.buf;
    Py_BEGIN_ALLOW_THREADS
    off[0] = 0;
    if (n > 0 && b[0] <= 32 && !is_ws(b[0])) odd = 1;
    Py_ssize_t pos = 0;
    for (;;) { /* pos: a record's first byte ('>') */
        if (records == capacity) { overflow = 1; break; }
        Py_ssize_t start = pos + 1, h = n, p = start;
        lines[records] = newlines;
        while (p < n) { /* the header line */
            Py_ssize_t q = next_low(b, p, n);
            if (q >= n) break;
            if (b[q] == '\n') { h = q; break; }
            if (!is_ws(b[q])) odd = 1;
            p = q + 1;
        }
        Py_ssize_t e = h; /* (an empty body: h = 0, the header is data[1:0]) */
        while (e > start && is_ws(b[e - 1])) e--;
        hs[records] = start;
        he[records] = e;
        int next = 0;
        if (h < n) {
            newlines++;
            p = h + 1;
            while (p < n) { /* sequence lines, up to a line starting with '>' */
                if (b[p] == '>') { next = 1; break; }
                for (;;) {
                    Py_ssize_t q = next_low(b, p, n);
                    memcpy(res + k, b + p, (size_t)(q - p));
                    k += q - p;
                    if (q >= n) { p = n; break; }
                    uint8_t c = b[q];
                    p = q + 1;
                    if (c == '\n') { newlines++; break; }
                    if (!is_ws(c)) { res[k++] = c; odd = 1; }
                }
            }
        }
        off[++records] = k;
        if (!next) break;
        pos = p;
    }
    Py_END_ALLOW_THREADS
    if (overflow) {
        PyErr_SetString(PyExc_ValueError, "split: more records than the arrays hold");
        goto done;
    }
    result = Py_BuildValue("nnO", k, newlines, odd ? Py_True : Py_False);
done:
    PyBuffer_Release(&body);
    PyBuffer_Release(&hs_b);
    PyBuffer_Release(&he_b);
    PyBuffer_Release(&lines_b);
    PyBuffer_Release(&off_b);
    PyBuffer_Release(&res_b);
    return result;
}

/* From `p`, over at most MAX_WALK bytes of `cls` (' ' or digits), never past `stop`; *slow is
 * set when the run reaches MAX_WALK. Backwards (dir -1) compares the byte before. */
static Py_ssize_t walk(const uint8_t *b, Py_ssize_t p, Py_ssize_t stop, int digits, int dir,
                       int *slow) {
    int steps = 0;
    while (steps < MAX_WALK) {
        if (dir > 0 ? p >= stop : p <= stop) break;
        uint8_t c = dir > 0 ? b[p] : b[p - 1];
        if (digits ? (c < '0' || c > '9') : c != ' ') break;
        p += dir;
        steps++;
    }
    if (steps == MAX_WALK) *slow = 1;
    return p;
}

static int token_at(const uint8_t *b, Py_ssize_t a, Py_ssize_t eq, const char *tok) {
    Py_ssize_t len = (Py_ssize_t)strlen(tok); /* without the '=' */
    if (eq - len - 1 < a || b[eq - len - 1] != ' ') return 0;
    return memcmp(b + eq - len, tok, (size_t)len) == 0;
}

static int has_prefix(const uint8_t *b, Py_ssize_t a, Py_ssize_t width, const char *pre) {
    Py_ssize_t len = (Py_ssize_t)strlen(pre);
    return width > len && memcmp(b + a, pre, (size_t)len) == 0;
}

/* parse_header_bytes' fields of one printable-ASCII header data[a:z] (pipeline.headers has the
 * grammar); flags SLOW for headers left to the regexes. */
static void header_one(const uint8_t *b, Py_ssize_t a, Py_ssize_t z, int64_t *acc_s,
                       int64_t *acc_e, int64_t *db_e, int64_t *desc_s, int64_t *desc_e,
                       int64_t *taxid, uint8_t *flags) {
    int slow = 0;
    Py_ssize_t p1 = z;
    for (Py_ssize_t j = a; j < z; j++) {
        uint8_t c = b[j];
        if (c < 32 || c > 127) slow = 1;
        if (c == ' ' && p1 == z) p1 = j;
    }
    Py_ssize_t r0 = walk(b, p1, z, 0, 1, &slow);
    Py_ssize_t width = p1 - a, p2 = p1;
    int kb = 0;
    if (width > 3 && (memcmp(b + a, "sp|", 3) == 0 || memcmp(b + a, "tr|", 3) == 0) &&
        b[a + 3] != '|') {
        for (Py_ssize_t j = a + 4; j < p1; j++)
            if (b[j] == '|') { p2 = j; kb = 1; break; }
    }
    Py_ssize_t uniref = 0;
    if (!kb) { /* pipeline.ids' UNIREF50, UNIREF90, UNIREF100 */
        if (has_prefix(b, a, width, "UniRef50_") || has_prefix(b, a, width, "UniRef90_"))
            uniref = 9;
        else if (has_prefix(b, a, width, "UniRef100_"))
            uniref = 10;
    }
    Py_ssize_t os_cut = -1, n_cut = -1, ox = -1, ox_end = -1, tax = -1, tax_end = -1;
    for (Py_ssize_t eq = a; eq < z; eq++) {
        if (b[eq] != '=') continue;
        if (token_at(b, a, eq, "OS")) {
            if (os_cut < 0) os_cut = walk(b, eq - 3, a, 0, -1, &slow);
        } else if (token_at(b, a, eq, "n")) {
            Py_ssize_t d = eq + 1, e = walk(b, d, z, 1, 1, &slow);
            if (n_cut < 0 && e > d && (e == z || b[e] == ' '))
                n_cut = walk(b, eq - 2, a, 0, -1, &slow);
        } else if (token_at(b, a, eq, "OX") || token_at(b, a, eq, "TaxID")) {
            int is_ox = b[eq - 1] == 'X';
            Py_ssize_t d = eq + 1, e = walk(b, d, z, 1, 1, &slow);
            if (e > d && is_ox && ox < 0) { ox = d; ox_end = e; }
            if (e > d && !is_ox && tax < 0) { tax = d; tax_end = e; }
        }
    }
    Py_ssize_t cut = kb ? os_cut : uniref ? n_cut : -1;
    Py_ssize_t dend = cut >= 0 ? (cut > r0 ? cut : r0) : z;
    *acc_s = kb ? a + 3 : a + uniref;
    *acc_e = kb ? p2 : p1;
    *db_e = kb ? a + 2 : uniref ? a + uniref - 1 : a;
    *desc_s = r0 < dend ? r0 : dend;
    *desc_e = dend;
    Py_ssize_t ds = ox >= 0 ? ox : tax, de = ox >= 0 ? ox_end : tax_end;
    int64_t value = 0;
    uint8_t flag = 0;
    if (ds >= 0) {
        if (de - ds > MAX_DIGITS) slow = 1;
        for (Py_ssize_t j = ds; j < de && !slow; j++) value = value * 10 + (b[j] - '0');
        flag = TAXID_VALID;
    }
    *taxid = slow ? 0 : value;
    *flags = flag | (slow ? SLOW : 0);
}

static PyObject *header_fields(PyObject *self, PyObject *args) {
    Py_buffer d, s, e, o[6], f;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*w*w*w*w*", &d, &s, &e, &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &f))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = s.len / 8;
    const int64_t *start = s.buf, *end = e.buf;
    int ok = need(&e, n, 8, "end") && need(&f, n, 1, "flags");
    for (int i = 0; i < 6 && ok; i++) ok = need(&o[i], n, 8, "field");
    if (!ok || span_bytes(start, end, n, d.len, "header_fields") < 0) goto done;
    int64_t *out[6];
    for (int i = 0; i < 6; i++) out[i] = o[i].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        header_one(d.buf, start[i], end[i], out[0] + i, out[1] + i, out[2] + i, out[3] + i,
                   out[4] + i, out[5] + i, (uint8_t *)f.buf + i);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    PyBuffer_Release(&e);
    for (int i = 0; i < 6; i++) PyBuffer_Release(&o[i]);
    PyBuffer_Release(&f);
    return result;
}

/* out = data[start[0]:end[0]] + data[start[1]:end[1]] + ... */
static PyObject *gather(PyObject *self, PyObject *args) {
    Py_buffer d, s, e, o;
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &d, &s, &e, &o)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = s.len / 8, total;
    const int64_t *start = s.buf, *end = e.buf;
    if (!need(&e, n, 8, "end") || (total = span_bytes(start, end, n, d.len, "gather")) < 0 ||
        !need(&o, total, 1, "out"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *dst = o.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(dst, (const uint8_t *)d.buf + start[i], (size_t)(end[i] - start[i]));
        dst += end[i] - start[i];
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    PyBuffer_Release(&e);
    PyBuffer_Release(&o);
    return result;
}

static PyObject *byte_counts(PyObject *self, PyObject *args) {
    Py_buffer d, c;
    if (!PyArg_ParseTuple(args, "y*w*", &d, &c)) return NULL;
    PyObject *result = NULL;
    if (!need(&c, 256, 8, "counts")) goto done;
    Py_BEGIN_ALLOW_THREADS
    uint64_t t[4][256];
    memset(t, 0, sizeof t);
    const uint8_t *b = d.buf;
    Py_ssize_t i = 0, n = d.len;
    for (; i + 4 <= n; i += 4) { /* four tables: no store-to-load stalls on runs */
        t[0][b[i]]++;
        t[1][b[i + 1]]++;
        t[2][b[i + 2]]++;
        t[3][b[i + 3]]++;
    }
    for (; i < n; i++) t[0][b[i]]++;
    int64_t *out = c.buf;
    for (int v = 0; v < 256; v++) out[v] += (int64_t)(t[0][v] + t[1][v] + t[2][v] + t[3][v]);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&d);
    PyBuffer_Release(&c);
    return result;
}

/* MD5 (RFC 1321) of each string, as lower-case hex: the `seq_hash` of ingest (the numpy twin
 * is polars-hash). One record is one short message: several are hashed at once, one per vector
 * lane (below), with no per-call set-up. */
#define MD5_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define MD5_G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
#define MD5_H(x, y, z) ((x) ^ (y) ^ (z))
#define MD5_I(x, y, z) ((y) ^ ((x) | ~(z)))
#define MD5_STEP(f, a, b, c, d, x, t, s)                 \
    (a) += f((b), (c), (d)) + (x) + (uint32_t)(t);       \
    (a) = ((a) << (s)) | ((a) >> (32 - (s)));            \
    (a) += (b);

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#define MD5_ROUNDS(a, b, c, d, x)                    \
    MD5_STEP(MD5_F, a, b, c, d, x[0], 0xd76aa478, 7) \
    MD5_STEP(MD5_F, d, a, b, c, x[1], 0xe8c7b756, 12) \
    MD5_STEP(MD5_F, c, d, a, b, x[2], 0x242070db, 17) \
    MD5_STEP(MD5_F, b, c, d, a, x[3], 0xc1bdceee, 22) \
    MD5_STEP(MD5_F, a, b, c, d, x[4], 0xf57c0faf, 7) \
    MD5_STEP(MD5_F, d, a, b, c, x[5], 0x4787c62a, 12) \
    MD5_STEP(MD5_F, c, d, a, b, x[6], 0xa8304613, 17) \
    MD5_STEP(MD5_F, b, c, d, a, x[7], 0xfd469501, 22) \
    MD5_STEP(MD5_F, a, b, c, d, x[8], 0x698098d8, 7) \
    MD5_STEP(MD5_F, d, a, b, c, x[9], 0x8b44f7af, 12) \
    MD5_STEP(MD5_F, c, d, a, b, x[10], 0xffff5bb1, 17) \
    MD5_STEP(MD5_F, b, c, d, a, x[11], 0x895cd7be, 22) \
    MD5_STEP(MD5_F, a, b, c, d, x[12], 0x6b901122, 7) \
    MD5_STEP(MD5_F, d, a, b, c, x[13], 0xfd987193, 12) \
    MD5_STEP(MD5_F, c, d, a, b, x[14], 0xa679438e, 17) \
    MD5_STEP(MD5_F, b, c, d, a, x[15], 0x49b40821, 22) \
    MD5_STEP(MD5_G, a, b, c, d, x[1], 0xf61e2562, 5) \
    MD5_STEP(MD5_G, d, a, b, c, x[6], 0xc040b340, 9) \
    MD5_STEP(MD5_G, c, d, a, b, x[11], 0x265e5a51, 14) \
    MD5_STEP(MD5_G, b, c, d, a, x[0], 0xe9b6c7aa, 20) \
    MD5_STEP(MD5_G, a, b, c, d, x[5], 0xd62f105d, 5) \
    MD5_STEP(MD5_G, d, a, b, c, x[10], 0x02441453, 9) \
    MD5_STEP(MD5_G, c, d, a, b, x[15], 0xd8a1e681, 14) \
    MD5_STEP(MD5_G, b, c, d, a, x[4], 0xe7d3fbc8, 20) \
    MD5_STEP(MD5_G, a, b, c, d, x[9], 0x21e1cde6, 5) \
    MD5_STEP(MD5_G, d, a, b, c, x[14], 0xc33707d6, 9) \
    MD5_STEP(MD5_G, c, d, a, b, x[3], 0xf4d50d87, 14) \
    MD5_STEP(MD5_G, b, c, d, a, x[8], 0x455a14ed, 20) \
    MD5_STEP(MD5_G, a, b, c, d, x[13], 0xa9e3e905, 5) \
    MD5_STEP(MD5_G, d, a, b, c, x[2], 0xfcefa3f8, 9) \
    MD5_STEP(MD5_G, c, d, a, b, x[7], 0x676f02d9, 14) \
    MD5_STEP(MD5_G, b, c, d, a, x[12], 0x8d2a4c8a, 20) \
    MD5_STEP(MD5_H, a, b, c, d, x[5], 0xfffa3942, 4) \
    MD5_STEP(MD5_H, d, a, b, c, x[8], 0x8771f681, 11) \
    MD5_STEP(MD5_H, c, d, a, b, x[11], 0x6d9d6122, 16) \
    MD5_STEP(MD5_H, b, c, d, a, x[14], 0xfde5380c, 23) \
    MD5_STEP(MD5_H, a, b, c, d, x[1], 0xa4beea44, 4) \
    MD5_STEP(MD5_H, d, a, b, c, x[4], 0x4bdecfa9, 11) \
    MD5_STEP(MD5_H, c, d, a, b, x[7], 0xf6bb4b60, 16) \
    MD5_STEP(MD5_H, b, c, d, a, x[10], 0xbebfbc70, 23) \
    MD5_STEP(MD5_H, a, b, c, d, x[13], 0x289b7ec6, 4) \
    MD5_STEP(MD5_H, d, a, b, c, x[0], 0xeaa127fa, 11) \
    MD5_STEP(MD5_H, c, d, a, b, x[3], 0xd4ef3085, 16) \
    MD5_STEP(MD5_H, b, c, d, a, x[6], 0x04881d05, 23) \
    MD5_STEP(MD5_H, a, b, c, d, x[9], 0xd9d4d039, 4) \
    MD5_STEP(MD5_H, d, a, b, c, x[12], 0xe6db99e5, 11) \
    MD5_STEP(MD5_H, c, d, a, b, x[15], 0x1fa27cf8, 16) \
    MD5_STEP(MD5_H, b, c, d, a, x[2], 0xc4ac5665, 23) \
    MD5_STEP(MD5_I, a, b, c, d, x[0], 0xf4292244, 6) \
    MD5_STEP(MD5_I, d, a, b, c, x[7], 0x432aff97, 10) \
    MD5_STEP(MD5_I, c, d, a, b, x[14], 0xab9423a7, 15) \
    MD5_STEP(MD5_I, b, c, d, a, x[5], 0xfc93a039, 21) \
    MD5_STEP(MD5_I, a, b, c, d, x[12], 0x655b59c3, 6) \
    MD5_STEP(MD5_I, d, a, b, c, x[3], 0x8f0ccc92, 10) \
    MD5_STEP(MD5_I, c, d, a, b, x[10], 0xffeff47d, 15) \
    MD5_STEP(MD5_I, b, c, d, a, x[1], 0x85845dd1, 21) \
    MD5_STEP(MD5_I, a, b, c, d, x[8], 0x6fa87e4f, 6) \
    MD5_STEP(MD5_I, d, a, b, c, x[15], 0xfe2ce6e0, 10) \
    MD5_STEP(MD5_I, c, d, a, b, x[6], 0xa3014314, 15) \
    MD5_STEP(MD5_I, b, c, d, a, x[13], 0x4e0811a1, 21) \
    MD5_STEP(MD5_I, a, b, c, d, x[4], 0xf7537e82, 6) \
    MD5_STEP(MD5_I, d, a, b, c, x[11], 0xbd3af235, 10) \
    MD5_STEP(MD5_I, c, d, a, b, x[2], 0x2ad7d2bb, 15) \
    MD5_STEP(MD5_I, b, c, d, a, x[9], 0xeb86d391, 21)

static const uint32_t MD5_IV[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};

static void md5_to_hex(const uint32_t st[4], uint8_t *hex) {
    static const char digits[] = "0123456789abcdef";
    for (int w = 0; w < 4; w++)
        for (int i = 0; i < 4; i++) {
            uint8_t byte = (uint8_t)(st[w] >> (8 * i));
            *hex++ = (uint8_t)digits[byte >> 4];
            *hex++ = (uint8_t)digits[byte & 15];
        }
}

/* A message's blocks: its whole 64-byte blocks in place, then one or two padded tail blocks
 * (0x80, zeros, the bit length). */
typedef struct {
    const uint8_t *p;
    size_t whole, next, total; /* whole blocks; the next block to hash; all blocks */
    uint8_t tail[128];
} md5_msg;

static void md5_msg_init(md5_msg *m, const uint8_t *p, size_t n) {
    size_t rest = n & 63, len = rest < 56 ? 64 : 128;
    m->p = p;
    m->whole = n >> 6;
    m->next = 0;
    m->total = m->whole + len / 64;
    memset(m->tail, 0, sizeof m->tail);
    memcpy(m->tail, p + (n - rest), rest);
    m->tail[rest] = 0x80;
    uint64_t bits = (uint64_t)n << 3;
    for (int i = 0; i < 8; i++) m->tail[len - 8 + i] = (uint8_t)(bits >> (8 * i));
}

static const uint8_t *md5_msg_block(const md5_msg *m) {
    return m->next < m->whole ? m->p + 64 * m->next : m->tail + 64 * (m->next - m->whole);
}

#if !defined(ESM2_SCALAR_MD5) && defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__))
/* Multi-buffer md5: MD5_LANES messages at once, one per lane of GCC/Clang vectors (AVX-512 or
 * AVX2 where the CPU has it; SSE2 or NEON otherwise). A lane that finishes its
 * message takes the next one, so messages of any lengths keep every lane busy. */
#define MD5_LANES 8
typedef uint32_t md5_vec __attribute__((vector_size(4 * MD5_LANES)));

/* Versions for AVX-512 (rotates in one instruction), AVX2 and the baseline, picked at load time
 * (GNU ifunc: glibc; x86-64-v4 needs GCC 11 or Clang 12). */
#if defined(__x86_64__) && defined(__GLIBC__)
#if defined(__clang__) ? __clang_major__ >= 14 : __GNUC__ >= 11
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif !defined(__clang__) && __GNUC__ >= 6
__attribute__((target_clones("avx2", "default")))
#endif
#endif
static void md5_block_lanes(md5_vec st[4], const uint8_t *const blocks[MD5_LANES]) {
    md5_vec x[16], a = st[0], b = st[1], c = st[2], d = st[3];
    for (int i = 0; i < 16; i++)
        for (int l = 0; l < MD5_LANES; l++) x[i][l] = le32(blocks[l] + 4 * i);
    MD5_ROUNDS(a, b, c, d, x)
    st[0] += a;
    st[1] += b;
    st[2] += c;
    st[3] += d;
}

/* Put message *next (if any is left) in lane l and start its state; 0 when none is left. */
static int md5_lane_load(md5_msg msgs[], md5_vec st[4], Py_ssize_t which[], int l,
                         Py_ssize_t *next, Py_ssize_t n, const uint8_t *data, const int64_t *off) {
    which[l] = *next < n ? (*next)++ : -1;
    if (which[l] < 0) return 0;
    md5_msg_init(&msgs[l], data + off[which[l]], (size_t)(off[which[l] + 1] - off[which[l]]));
    for (int w = 0; w < 4; w++) st[w][l] = MD5_IV[w];
    return 1;
}

static void md5_hex_lanes(const uint8_t *data, const int64_t *off, Py_ssize_t n, uint8_t *hex) {
    static const uint8_t idle[64];
    md5_msg msgs[MD5_LANES];
    Py_ssize_t which[MD5_LANES]; /* the message in each lane, -1: idle */
    md5_vec st[4];
    Py_ssize_t next = 0, busy = 0;
    for (int l = 0; l < MD5_LANES; l++) busy += md5_lane_load(msgs, st, which, l, &next, n, data, off);
    while (busy) {
        const uint8_t *blocks[MD5_LANES];
        for (int l = 0; l < MD5_LANES; l++) blocks[l] = which[l] < 0 ? idle : md5_msg_block(&msgs[l]);
        md5_block_lanes(st, blocks);
        for (int l = 0; l < MD5_LANES; l++) {
            if (which[l] < 0 || ++msgs[l].next < msgs[l].total) continue;
            uint32_t done[4] = {st[0][l], st[1][l], st[2][l], st[3][l]};
            md5_to_hex(done, hex + 32 * which[l]);
            if (!md5_lane_load(msgs, st, which, l, &next, n, data, off)) busy--;
        }
    }
}
#else /* one message at a time */
static void md5_block(uint32_t st[4], const uint8_t *p) {
    uint32_t x[16], a = st[0], b = st[1], c = st[2], d = st[3];
    for (int i = 0; i < 16; i++) x[i] = le32(p + 4 * i);
    MD5_ROUNDS(a, b, c, d, x)
    st[0] += a;
    st[1] += b;
    st[2] += c;
    st[3] += d;
}

static void md5_hex_one(const uint8_t *p, size_t n, uint8_t *hex) {
    uint32_t st[4] = {MD5_IV[0], MD5_IV[1], MD5_IV[2], MD5_IV[3]};
    md5_msg m;
    md5_msg_init(&m, p, n);
    for (; m.next < m.total; m.next++) md5_block(st, md5_msg_block(&m));
    md5_to_hex(st, hex);
}

static void md5_hex_lanes(const uint8_t *data, const int64_t *off, Py_ssize_t n, uint8_t *hex) {
    for (Py_ssize_t i = 0; i < n; i++)
        md5_hex_one(data + off[i], (size_t)(off[i + 1] - off[i]), hex + 32 * i);
}
#endif

/* A kernel over the strings data[offsets[i]:offsets[i+1]], i < n, writing its results to out. */
typedef void (*string_kernel)(const uint8_t *data, const int64_t *off, Py_ssize_t n, void *out);

/* The Python call (data, offsets, out) of a string kernel whose results are `width` bytes per
 * string: checks the offsets and the output's size, runs `kernel` without the GIL. */
static PyObject *per_string(PyObject *args, const char *name, Py_ssize_t width,
                            const char *out_name, string_kernel kernel) {
    Py_buffer d, o, h;
    if (!PyArg_ParseTuple(args, "y*y*w*", &d, &o, &h)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = o.len / 8 - 1;
    const int64_t *off = o.buf;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "%s: no offsets", name);
        goto done;
    }
    if (!need(&h, n, width, out_name) || span_bytes(off, off + 1, n, d.len, name) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    kernel((const uint8_t *)d.buf, off, n, h.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&d);
    PyBuffer_Release(&o);
    PyBuffer_Release(&h);
    return result;
}

static void md5_hex_kernel(const uint8_t *data, const int64_t *off, Py_ssize_t n, void *out) {
    md5_hex_lanes(data, off, n, (uint8_t *)out);
}

static PyObject *md5_hex(PyObject *self, PyObject *args) {
    return per_string(args, "md5_hex", 32, "hex", md5_hex_kernel);
}

/* A 64-bit hash of each string data[offsets[i]:offsets[i+1]]: FNV-1a, then SplitMix64's
 * finalizer (every input bit reaches the top bits, which pick a partition). The numpy twin is
 * pipeline.partition.string_hashes. */
#define FNV_OFFSET 14695981039346656037ULL
#define FNV_PRIME 1099511628211ULL

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void fnv_kernel(const uint8_t *data, const int64_t *off, Py_ssize_t n, void *out) {
    uint64_t *hashes = out;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t x = FNV_OFFSET;
        for (int64_t p = off[i]; p < off[i + 1]; p++) x = (x ^ data[p]) * FNV_PRIME;
        hashes[i] = mix64(x);
    }
}

static PyObject *string_hashes(PyObject *self, PyObject *args) {
    return per_string(args, "string_hashes", 8, "hashes", fnv_kernel);
}

static PyMethodDef methods[] = {
    {"count_records", count_records, METH_VARARGS, "Records in a chunk (1 + its '\\n>')."},
    {"count_newlines", count_newlines, METH_VARARGS, "Newline bytes in a buffer."},
    {"split", split, METH_VARARGS, "Split a chunk into records (see pipeline.fasta)."},
    {"header_fields", header_fields, METH_VARARGS, "Header field spans (pipeline.headers)."},
    {"gather", gather, METH_VARARGS, "Concatenate byte spans into a buffer."},
    {"byte_counts", byte_counts, METH_VARARGS, "Add each byte value's count to counts."},
    {"string_hashes", string_hashes, METH_VARARGS, "FNV-1a (mixed) of each string."},
    {"md5_hex", md5_hex, METH_VARARGS, "Hex md5 of each string data[offsets[i]:offsets[i+1]]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
