/*
 * guard.dataplane._walk: where a PredictResponse keeps its parts, read in place.
 *
 * The upb parse behind the protobuf view (guard/dataplane/codec/views.py) copies
 * every tensor's values twice (into its arena, then into a Python bytes object)
 * and builds a Python object
 * per field touched; in a loaded proxy, with cold caches, that is a large part
 * of what guarding a small response costs. walk_predict_response() reads the
 * same layout in one pass and returns offsets into the caller's bytes.
 *
 * It accepts a strict subset of the wire format: only the fields TensorFlow
 * Serving writes, each where protobuf encoders put it, with canonical varints
 * and tags, ASCII strings, no duplicates, and no unknown fields. Everything it
 * accepts, protobuf accepts too and reads the same way (tests/dataplane/test_walk.py
 * and the fuzzer check both against upb). For anything else it returns None and
 * guard/dataplane/codec/response.py parses the response with protobuf, which
 * stays the judge of what is malformed.
 *
 * scan_tensor() does the same for REST: a tensor's JSON text, its numbers and
 * its shape read in one pass, each value rounded once (as float() rounds);
 * anything it does not read (an odd token, a ragged or empty list) makes it
 * return None, and guard/dataplane/codec/restjson/numbers.py's numpy scan,
 * the reference, judges the text.
 *
 * peek_request() finds a REST predict request's signature_name and format
 * without reading its numbers, as guard/server/rest/peek.py's reference does.
 *
 * skip_value() finds where a REST output's non-numeric value ends, as
 * restjson/structure.py's _skip_value does; numbers_at_most() bounds how many
 * numbers a REST body may hold, as restjson/read.py's numbers_at_most does.
 *
 * reuse_texts() and row_members() are the two loops of writing a REST body's
 * derived outputs, as restjson's Python loops do them (restjson/members.py,
 * restjson/response.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

typedef struct {
    const unsigned char *p, *end;
} Cur;

/* Shapes deeper than this are left to the protobuf path (the guard refuses
 * ranks above 32 there, with an error that says so). */
#define MAX_DIMS 64

/* TensorFlow's DataType values the guard reads, and the packed field of each. */
enum { DT_FLOAT = 1, DT_DOUBLE = 2, DT_BFLOAT16 = 14, DT_HALF = 19 };

/* A varint as encoders write it: at most 10 bytes, no redundant trailing
 * zero byte, and a 10th byte of 0 or 1. */
static int
read_varint(Cur *c, uint64_t *out)
{
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (c->p >= c->end)
            return 0;
        unsigned b = *c->p++;
        if (i == 9 && b > 1)
            return 0;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (i > 0 && b == 0)
                return 0;
            *out = v;
            return 1;
        }
    }
    return 0;
}

/* A field key of one or two bytes (field numbers 1 to 2047). */
static int
read_tag(Cur *c, unsigned *field, unsigned *wire_type)
{
    const unsigned char *start = c->p;
    uint64_t key;
    if (!read_varint(c, &key) || c->p - start > 2)
        return 0;
    *field = (unsigned)(key >> 3);
    *wire_type = (unsigned)(key & 7);
    return *field != 0;
}

/* A length-delimited payload: its bytes become *sub, and c moves past them. */
static int
read_len(Cur *c, Cur *sub)
{
    uint64_t n;
    if (!read_varint(c, &n) || n > (uint64_t)(c->end - c->p) || n > INT32_MAX)
        return 0;
    sub->p = c->p;
    sub->end = c->p + n;
    c->p += n;
    return 1;
}

/* proto3 strings must be UTF-8; ASCII is the subset taken here. */
static int
is_ascii(Cur s)
{
    unsigned char any = 0;
    for (const unsigned char *q = s.p; q < s.end; q++)
        any |= *q;
    return any < 0x80;
}

static int
packed_varints(Cur s)
{
    uint64_t v;
    while (s.p < s.end)
        if (!read_varint(&s, &v))
            return 0;
    return 1;
}

/* TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1, string name = 2).
 * unknown_rank (3) is left to protobuf. Fills dims[]; returns the rank or -1. */
static int
walk_shape(Cur s, int64_t *dims)
{
    int rank = 0;
    unsigned field, wt;
    while (s.p < s.end) {
        Cur dim;
        if (!read_tag(&s, &field, &wt) || field != 2 || wt != 2 || !read_len(&s, &dim) ||
            rank == MAX_DIMS)
            return -1;
        int64_t size = 0;
        int seen_size = 0, seen_name = 0;
        while (dim.p < dim.end) {
            if (!read_tag(&dim, &field, &wt))
                return -1;
            if (field == 1 && wt == 0 && !seen_size) {
                uint64_t v;
                if (!read_varint(&dim, &v))
                    return -1;
                size = (int64_t)v;
                seen_size = 1;
            }
            else if (field == 2 && wt == 2 && !seen_name) {
                Cur name;
                if (!read_len(&dim, &name) || !is_ascii(name))
                    return -1;
                seen_name = 1;
            }
            else
                return -1;
        }
        dims[rank++] = size;
    }
    return rank;
}

/* The packed field that holds a float dtype's values, or 0. */
static unsigned
values_field(int32_t dtype)
{
    switch (dtype) {
    case DT_FLOAT:
        return 5;
    case DT_DOUBLE:
        return 6;
    case DT_HALF:
        return 13;
    default:
        return 0;
    }
}

/* Whether a tensor of a dtype the rules read carries its own values only, in
 * one place: no other type's value field, and tensor_content (if sent) not
 * empty and not beside its typed field. A rewrite writes the
 * values alone over their place and kept any such field as it came, where
 * the reference route writes the tensor anew without it (a red-team pass: a
 * DT_FLOAT output's stray double_val reached the client unguarded). */
static int
own_values_only(int32_t dtype, uint32_t seen, const Cur *where)
{
    unsigned own = values_field(dtype);
    if (own == 0) {
        /* a dtype the rules leave alone: no float values (float_val,
         * double_val, or half_val but DT_BFLOAT16's own), which a client
         * reading those fields would read; the reference refuses them */
        uint32_t floats = (1u << 5) | (1u << 6) | (dtype == DT_BFLOAT16 ? 0 : (1u << 13));
        return !(seen & floats);
    }
    /* the value fields: 5 to 13 but tensor_content's 4, and 16 to 18 */
    const uint32_t value_fields = (0x3FEu << 4) | (0x7u << 16);
    if (seen & value_fields & ~(1u << own))
        return 0;
    if (!(seen & (1u << 4)))
        return 1;
    /* tensor_content: not empty, and alone (the reference refuses values in
     * both, which TensorFlow and a float_val reader read differently) */
    return where[4].end > where[4].p && !(seen & (1u << own));
}

/* An output's layout: a named tuple (a struct sequence), made in C. */
static PyStructSequence_Field layout_fields[] = {
    {"name", "the output's name (its map key)"},
    {"dtype", "the TensorProto's dtype enum"},
    {"shape", "the dimensions, a tuple of ints"},
    {"from_content", "1 when the values are tensor_content, else 0"},
    {"offset", "where the values start in the response bytes"},
    {"length", "how many bytes they take (0 when absent)"},
    {NULL, NULL},
};

static PyStructSequence_Desc layout_desc = {
    "guard.dataplane._walk.OutputLayout",
    "Where one output of a PredictResponse keeps its parts.",
    layout_fields,
    6,
};

static PyTypeObject *LayoutType;

/* One output -> (name, dtype, dims, from_content, offset, length); offset and
 * length locate tensor_content when from_content is 1, else the packed run of
 * the dtype's own value field (length 0 when absent). NULL without an
 * exception: not in the subset. */
static PyObject *
walk_tensor(PyObject *name, Cur t, const unsigned char *base)
{
    int64_t dims[MAX_DIMS];
    int rank = 0;
    int32_t dtype = 0;
    uint32_t seen = 0; /* one bit per field number; string_val (8) may repeat */
    Cur where[19] = {{0}};
    unsigned field, wt;
    while (t.p < t.end) {
        if (!read_tag(&t, &field, &wt) || field > 18 || field == 14 || field == 15)
            return NULL;
        if (field != 8 && (seen & (1u << field)))
            return NULL;
        seen |= 1u << field;
        uint64_t v;
        Cur payload;
        if (field == 1 || field == 3) {
            /* dtype, version_number: int32 (an enum in TF), as protobuf narrows it */
            if (wt != 0 || !read_varint(&t, &v))
                return NULL;
            if (field == 1)
                dtype = (int32_t)(uint32_t)v;
            continue;
        }
        if (wt != 2 || !read_len(&t, &payload))
            return NULL;
        where[field] = payload;
        Py_ssize_t n = payload.end - payload.p;
        switch (field) {
        case 2:
            rank = walk_shape(payload, dims);
            if (rank < 0)
                return NULL;
            break;
        case 5: /* float_val */
        case 9: /* scomplex_val */
            if (n % 4)
                return NULL;
            break;
        case 6:  /* double_val */
        case 12: /* dcomplex_val */
            if (n % 8)
                return NULL;
            break;
        case 7:  /* int_val */
        case 10: /* int64_val */
        case 11: /* bool_val */
        case 13: /* half_val */
        case 16: /* uint32_val */
        case 17: /* uint64_val */
            if (!packed_varints(payload))
                return NULL;
            break;
        default: /* 4 tensor_content, 8 string_val, 18 float8_val: any bytes */
            break;
        }
    }
    if (!own_values_only(dtype, seen, where))
        return NULL;
    int from_content = where[4].p != NULL && where[4].end > where[4].p;
    Cur values = from_content ? where[4] : where[values_field(dtype)];
    Py_ssize_t offset = values.p ? values.p - base : 0;
    Py_ssize_t length = values.p ? values.end - values.p : 0;
    PyObject *shape = PyTuple_New(rank);
    if (shape == NULL)
        return NULL;
    for (int i = 0; i < rank; i++) {
        PyObject *d = PyLong_FromLongLong(dims[i]);
        if (d == NULL) {
            Py_DECREF(shape);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, i, d);
    }
    PyObject *layout = PyStructSequence_New(LayoutType);
    if (layout == NULL) {
        Py_DECREF(shape);
        return NULL;
    }
    PyObject *items[6] = {Py_NewRef(name), PyLong_FromLong(dtype), shape,
                          PyLong_FromLong(from_content), PyLong_FromSsize_t(offset),
                          PyLong_FromSsize_t(length)};
    for (int i = 0; i < 6; i++) {
        if (items[i] == NULL) {
            for (int j = i; j < 6; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(layout);
            return NULL;
        }
        PyStructSequence_SET_ITEM(layout, i, items[i]);
    }
    return layout;
}

/* ModelSpec: string name = 1, Int64Value version = 2, string signature_name = 3.
 * version_label (4) is left to protobuf. */
static int
walk_spec(Cur s)
{
    unsigned field, wt, seen = 0;
    while (s.p < s.end) {
        Cur payload;
        if (!read_tag(&s, &field, &wt) || wt != 2 || field < 1 || field > 3 ||
            (seen & (1u << field)) || !read_len(&s, &payload))
            return 0;
        seen |= 1u << field;
        if (field == 2) {
            uint64_t v;
            int seen_value = 0;
            while (payload.p < payload.end) {
                if (!read_tag(&payload, &field, &wt) || field != 1 || wt != 0 || seen_value ||
                    !read_varint(&payload, &v))
                    return 0;
                seen_value = 1;
            }
        }
        else if (!is_ascii(payload))
            return 0;
    }
    return 1;
}

PyDoc_STRVAR(walk_doc,
             "walk_predict_response(data, /) -> (model_spec, outputs, by_name) | None\n\n"
             "The layout of a serialized PredictResponse, read in place. model_spec is\n"
             "the ModelSpec's bytes (None when absent); outputs holds one OutputLayout\n"
             "(name, dtype, shape, from_content, offset, length) per output, in wire\n"
             "order, where offset and length locate tensor_content (from_content 1) or\n"
             "the packed values of the dtype's own field (float_val, double_val or\n"
             "half_val; length 0 when absent) in data; by_name maps each name to its\n"
             "tuple. None when the bytes fall outside the strict subset read here,\n"
             "or hold no output: parse those with protobuf.");

static PyObject *
walk_predict_response(PyObject *Py_UNUSED(self), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *base = view.buf;
    Cur c = {base, base + view.len};
    PyObject *outputs = PyDict_New(), *order = PyList_New(0);
    PyObject *spec = NULL, *result = NULL;
    if (outputs == NULL || order == NULL)
        goto done;
    unsigned field, wt;
    while (c.p < c.end) {
        Cur payload;
        if (!read_tag(&c, &field, &wt) || wt != 2 || !read_len(&c, &payload))
            goto decline;
        if (field == 2) { /* model_spec */
            if (spec != NULL || !walk_spec(payload))
                goto decline;
            spec = PyBytes_FromStringAndSize((const char *)payload.p, payload.end - payload.p);
            if (spec == NULL)
                goto done;
            continue;
        }
        if (field != 1)
            goto decline;
        /* One outputs entry: exactly key = 1, then value = 2. */
        Cur key, tensor;
        if (!read_tag(&payload, &field, &wt) || field != 1 || wt != 2 ||
            !read_len(&payload, &key) || !is_ascii(key) ||
            !read_tag(&payload, &field, &wt) || field != 2 || wt != 2 ||
            !read_len(&payload, &tensor) || payload.p != payload.end)
            goto decline;
        PyObject *name = PyUnicode_DecodeASCII((const char *)key.p, key.end - key.p, NULL);
        if (name == NULL)
            goto done;
        int repeated = PyDict_Contains(outputs, name);
        PyObject *entry = repeated ? NULL : walk_tensor(name, tensor, base);
        if (entry == NULL) {
            Py_DECREF(name);
            if (repeated < 0 || PyErr_Occurred())
                goto done;
            goto decline;
        }
        int failed = PyDict_SetItem(outputs, name, entry) || PyList_Append(order, entry);
        Py_DECREF(name);
        Py_DECREF(entry);
        if (failed)
            goto done;
    }
    if (PyDict_GET_SIZE(outputs) == 0)
        goto decline;
    PyObject *in_order = PyList_AsTuple(order);
    if (in_order != NULL)
        result = Py_BuildValue("(ONO)", spec != NULL ? spec : Py_None, in_order, outputs);
    goto done;
decline:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(spec);
    Py_XDECREF(outputs);
    Py_XDECREF(order);
    PyBuffer_Release(&view);
    return result;
}


/* ------------------------------------------------------------ REST numbers */

/* A JSON number as RFC 8259 writes it, or TF Serving's bare NaN, Infinity and
 * -Infinity, read in one pass: sign, up to 19 significant digits as an integer
 * (more: *digits says so), the digits after the point, the exponent. */
typedef struct {
    int neg, special, integral, digits, frac;
    uint64_t mantissa;
    long exponent;
} Token;

static int
read_digits(const unsigned char *t, Py_ssize_t n, Py_ssize_t *i, Token *k, int fraction)
{
    Py_ssize_t start = *i;
    for (; *i < n && t[*i] >= '0' && t[*i] <= '9'; (*i)++) {
        if (k->digits < 19 || (k->digits == 19 && k->mantissa == 0)) {
            k->mantissa = k->mantissa * 10 + (uint64_t)(t[*i] - '0');
            k->digits += k->mantissa != 0;
            k->frac += fraction;
        } else {
            k->digits = 20; /* more than this fast path reads */
        }
    }
    return *i > start;
}

static int
json_number(const unsigned char *t, Py_ssize_t n, Token *k)
{
    Py_ssize_t i = 0;
    memset(k, 0, sizeof *k);
    if ((n == 3 && memcmp(t, "NaN", 3) == 0) || (n == 8 && memcmp(t, "Infinity", 8) == 0) ||
        (n == 9 && memcmp(t, "-Infinity", 9) == 0)) {
        k->special = 1;
        return 1;
    }
    if (i < n && t[i] == '-') {
        k->neg = 1;
        i++;
    }
    if (i >= n || !(t[i] >= '0' && t[i] <= '9') || (t[i] == '0' && i + 1 < n && t[i + 1] >= '0'
                                                    && t[i + 1] <= '9'))
        return 0;
    read_digits(t, n, &i, k, 0);
    k->integral = 1;
    if (i < n && t[i] == '.') {
        k->integral = 0;
        i++;
        if (!read_digits(t, n, &i, k, 1))
            return 0;
    }
    if (i < n && (t[i] == 'e' || t[i] == 'E')) {
        k->integral = 0;
        int eneg = 0;
        i++;
        if (i < n && (t[i] == '+' || t[i] == '-'))
            eneg = t[i++] == '-';
        Py_ssize_t d = i;
        for (; i < n && t[i] >= '0' && t[i] <= '9'; i++)
            if (k->exponent < 100000)
                k->exponent = k->exponent * 10 + (t[i] - '0');
        if (i == d)
            return 0;
        if (eneg)
            k->exponent = -k->exponent;
    }
    return i == n;
}

static const double P10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                             1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                             1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* Clinger's fast path: an exact mantissa (< 2^53) times or over an exact power
 * of ten is rounded once, as strtod rounds. */
static int
fast_value(const Token *k, double *v)
{
    long scale = k->exponent - k->frac;
    if (k->digits > 19 || k->mantissa > (1ull << 53) || scale < -22 || scale > 22)
        return 0;
    double m = (double)k->mantissa;
    m = scale < 0 ? m / P10[-scale] : m * P10[scale];
    *v = k->neg ? -m : m;
    return 1;
}

/* What each byte is to the tensor scan: part of a token, or structure. */
enum { C_TOKEN = 0, C_SPACE, C_COMMA, C_OPEN, C_CLOSE };

static unsigned char CLASS[256];

static void
init_classes(void)
{
    CLASS[' '] = CLASS['\t'] = CLASS['\n'] = CLASS['\r'] = C_SPACE;
    CLASS[','] = C_COMMA;
    CLASS['['] = C_OPEN;
    CLASS[']'] = C_CLOSE;
}

/* Longer tokens (and integers past int64) go to the numpy path. */
#define MAX_TOKEN 63

typedef struct {
    double *values;
    int64_t *starts, *ends, *ints;
    Py_ssize_t n, cap, longest;
    int integral, ints_ok;
} Numbers;

/* One token: its value, correctly rounded by strtod (as float() rounds), and
 * its integer value when it is an integer literal. 0: leave it to numpy. */
static int
scan_token(const unsigned char *t, Py_ssize_t len, Numbers *out)
{
    Token k;
    if (len > MAX_TOKEN || !json_number(t, len, &k))
        return 0;
    double v;
    if (k.special) {
        v = t[0] == 'N' ? NAN : (t[0] == '-' ? -INFINITY : INFINITY);
    } else if (!fast_value(&k, &v)) {
        char text[MAX_TOKEN + 1];
        memcpy(text, t, (size_t)len);
        text[len] = '\0';
        v = strtod(text, NULL);
    }
    out->values[out->n] = v;
    if (!k.integral) {
        out->integral = 0;
    } else if (!out->integral) {
        /* The int64 values are wanted only while every token is an integer:
         * left unwritten after, their pages are never touched. */
    } else if (k.digits <= 18) {
        out->ints[out->n] = k.neg ? -(int64_t)k.mantissa : (int64_t)k.mantissa;
    } else {
        char text[MAX_TOKEN + 1];
        memcpy(text, t, (size_t)len);
        text[len] = '\0';
        errno = 0;
        long long i = strtoll(text, NULL, 10);
        if (errno == ERANGE)
            out->ints_ok = 0;
        out->ints[out->n] = (int64_t)i;
    }
    return 1;
}

/* Where the scan is in the nesting: each list's element count, checked
 * against the first list closed at the same depth. */
typedef struct {
    int depth, rank, expect, done;
    Py_ssize_t count[MAX_DIMS + 1], dims[MAX_DIMS + 1];
} Nesting;

static int
open_list(Nesting *s)
{
    if (!s->expect || s->done || s->depth == MAX_DIMS || (s->rank >= 0 && s->depth >= s->rank))
        return 0;
    s->count[++s->depth] = 0;
    return 1;
}

/* An empty list, a trailing comma or a ragged list: not a dense tensor this
 * scan reads (the reference says what it is). */
static int
close_list(Nesting *s)
{
    if (s->depth == 0 || s->expect)
        return 0;
    Py_ssize_t n = s->count[s->depth];
    if (s->dims[s->depth] == 0)
        s->dims[s->depth] = n;
    else if (s->dims[s->depth] != n)
        return 0;
    if (--s->depth == 0)
        s->done = 1;
    else
        s->count[s->depth]++;
    return 1;
}

/* Whether the 8 bytes at p are all ASCII digits, and their value (SWAR). */
static inline int
eight_digits(const unsigned char *p, uint64_t *value)
{
    uint64_t x;
    memcpy(&x, p, 8);
    if (((x & 0xF0F0F0F0F0F0F0F0ull) | (((x + 0x0606060606060606ull) & 0xF0F0F0F0F0F0F0F0ull) >> 4))
        != 0x3333333333333333ull)
        return 0;
    x -= 0x3030303030303030ull;
    x = (x * 10 + (x >> 8)) & 0x00FF00FF00FF00FFull; /* pairs of digits */
    x = (x * 100 + (x >> 16)) & 0x0000FFFF0000FFFFull; /* fours */
    *value = (x * 10000 + (x >> 32)) & 0xFFFFFFFFull; /* eight (little-endian) */
    return 1;
}

static inline Py_ssize_t
digit_run(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, uint64_t *m, int *digits)
{
    uint64_t eight;
    while (i + 8 <= end && eight_digits(p + i, &eight)) {
        *m = *m * 100000000ull + eight;
        *digits += 8;
        i += 8;
    }
    for (; i < end && (unsigned)(p[i] - '0') < 10; i++, (*digits)++)
        *m = *m * 10 + (uint64_t)(p[i] - '0');
    return i;
}

/* The common token, -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]{1,4})? with at
 * most 19 digits and a value Clinger's fast path rounds, read as it is found.
 * Returns its end, or -1 for any other token (scan_token reads those). */
static Py_ssize_t
quick_token(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, Numbers *out)
{
    int neg = p[i] == '-', digits = 0, frac = 0, integral = 1;
    uint64_t m = 0;
    i += neg;
    if (i >= end || p[i] < '0' || p[i] > '9' || (p[i] == '0' && i + 1 < end && p[i + 1] >= '0'
                                                 && p[i + 1] <= '9'))
        return -1;
    i = digit_run(p, i, end, &m, &digits);
    if (i < end && p[i] == '.') {
        Py_ssize_t first = ++i;
        i = digit_run(p, i, end, &m, &digits);
        frac = (int)(i - first);
        integral = 0;
        if (frac == 0)
            return -1;
    }
    long exponent = 0;
    if (i < end && (p[i] == 'e' || p[i] == 'E')) {
        int eneg = 0;
        integral = 0;
        i++;
        if (i < end && (p[i] == '+' || p[i] == '-'))
            eneg = p[i++] == '-';
        Py_ssize_t first = i;
        for (; i < end && p[i] >= '0' && p[i] <= '9'; i++)
            if (i - first < 5) /* past 4 digits it is refused below: no overflow */
                exponent = exponent * 10 + (p[i] - '0');
        if (i == first || i - first > 4)
            return -1;
        exponent = eneg ? -exponent : exponent;
    }
    long scale = exponent - frac;
    if ((i < end && CLASS[p[i]] == C_TOKEN) || digits > 19 || m > (1ull << 53) || scale < -22
        || scale > 22)
        return -1;
    double v = (double)m;
    v = scale < 0 ? v / P10[-scale] : v * P10[scale];
    out->values[out->n] = neg ? -v : v;
    out->integral &= integral;
    if (out->integral)
        out->ints[out->n] = neg ? -(int64_t)m : (int64_t)m;
    return i;
}

enum { SCAN_FAIL = 0, SCAN_OK, SCAN_FULL };

static int
add_token(Nesting *s, const unsigned char *p, Py_ssize_t start, Py_ssize_t *end,
          Py_ssize_t limit, Numbers *out)
{
    if (!s->expect || s->done || (s->rank >= 0 && s->depth != s->rank))
        return SCAN_FAIL;
    if (out->n == out->cap)
        return SCAN_FULL;
    s->rank = s->depth;
    Py_ssize_t stop = quick_token(p, start, limit, out);
    if (stop < 0) {
        for (stop = start; stop < limit && CLASS[p[stop]] == C_TOKEN; stop++)
            ;
        if (!scan_token(p + start, stop - start, out))
            return 0;
    }
    out->starts[out->n] = start;
    out->ends[out->n] = stop;
    out->longest = Py_MAX(out->longest, stop - start);
    *end = stop;
    out->n++;
    s->count[s->depth]++;
    s->expect = 0;
    s->done = s->depth == 0;
    return 1;
}

/* One dense tensor's text from p[*pos]: a number, or nested lists of numbers,
 * every list of a depth as long as the others. SCAN_OK with *pos where it ends
 * (the text after it is not read); SCAN_FULL with *pos at a token there was
 * no room for (grow the arrays, then call again); SCAN_FAIL for anything else. */
static int
scan_tensor_text(const unsigned char *p, Py_ssize_t *pos, Py_ssize_t end, Numbers *out,
                 Nesting *s)
{
    Py_ssize_t i = *pos;
    int status = SCAN_OK;
    while (i < end && !s->done && status == SCAN_OK) {
        switch (CLASS[p[i]]) {
        case C_SPACE:
            i++;
            continue;
        case C_OPEN:
            status = open_list(s) ? SCAN_OK : SCAN_FAIL;
            s->expect = 1;
            break;
        case C_CLOSE:
            status = close_list(s) ? SCAN_OK : SCAN_FAIL;
            break;
        case C_COMMA:
            status = s->expect || s->depth == 0 ? SCAN_FAIL : SCAN_OK;
            s->expect = 1;
            break;
        default:
            status = add_token(s, p, i, &i, end, out);
            continue;
        }
        i += status == SCAN_OK;
    }
    *pos = i;
    return status == SCAN_OK && !s->done ? SCAN_FAIL : status;
}

/* Room for the tokens there are likely to be, grown when there are more:
 * counting them first took as long as reading them. The first guess is
 * bounded, as the limit may lie far beyond the tensor; what is not used is
 * handed back after the scan. */
static int
resize(PyObject *arrays[4], Numbers *out, Py_ssize_t n)
{
    for (int a = 0; a < 4; a++)
        if (PyByteArray_Resize(arrays[a], n * 8) < 0)
            return -1;
    out->values = (double *)PyByteArray_AS_STRING(arrays[0]);
    out->starts = (int64_t *)PyByteArray_AS_STRING(arrays[1]);
    out->ends = (int64_t *)PyByteArray_AS_STRING(arrays[2]);
    out->ints = (int64_t *)PyByteArray_AS_STRING(arrays[3]);
    out->cap = n;
    return 0;
}

/* A DT_FLOAT's text has at most 15 characters (json_tensor.cc's WriteDecimal:
 * 9 significant digits); longer tokens make the tensor float64. */
#define FLOAT32_TOKEN_MAX 15

/* Text -> double -> float32 can round differently from text -> float32 only
 * where the double lies exactly halfway between two float32s, or below
 * float32's normal range: those are decided from the text by the caller. */
static inline int
suspect(double v)
{
    uint64_t bits;
    memcpy(&bits, &v, 8);
    return (((bits & ((1ull << 29) - 1)) == (1ull << 28)) && isfinite(v))
           || (fabs(v) < 0x1p-126 && v != 0);
}

/* The values as float32, and how many are suspect: 0 when one does not fit
 * (then the tensor is float64). */
static int
as_float32(const Numbers *out, float *single, Py_ssize_t *suspects)
{
    *suspects = 0;
    for (Py_ssize_t i = 0; i < out->n; i++) {
        double v = out->values[i];
        float f = (float)v;
        single[i] = f;
        if ((isfinite(v) && !isfinite(f)) || (f == 0 && v != 0))
            return 0;
        *suspects += suspect(v);
    }
    return 1;
}

static PyObject *
suspect_list(const Numbers *out)
{
    PyObject *list = PyList_New(0);
    for (Py_ssize_t i = 0; list != NULL && i < out->n; i++) {
        if (!suspect(out->values[i]))
            continue;
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL || PyList_Append(list, index) < 0)
            Py_CLEAR(list);
        Py_XDECREF(index);
    }
    return list;
}

/* (float32 values, indices to decide from the text), or (None, None) where the
 * tensor is int64 or float64. */
static PyObject *
singles_of(const Numbers *out)
{
    if (out->longest > FLOAT32_TOKEN_MAX)
        return Py_BuildValue("(OO)", Py_None, Py_None);
    PyObject *single = PyByteArray_FromStringAndSize(NULL, out->n * 4);
    if (single == NULL)
        return NULL;
    Py_ssize_t suspects;
    int fits;
    float *f = (float *)PyByteArray_AS_STRING(single);
    Py_BEGIN_ALLOW_THREADS
    fits = as_float32(out, f, &suspects);
    Py_END_ALLOW_THREADS
    if (!fits) {
        Py_DECREF(single);
        return Py_BuildValue("(OO)", Py_None, Py_None);
    }
    PyObject *list = suspects ? suspect_list(out) : PyList_New(0);
    if (list == NULL) {
        Py_DECREF(single);
        return NULL;
    }
    return Py_BuildValue("(NN)", single, list);
}

static PyObject *
tensor_result(Numbers *out, Nesting *s, Py_ssize_t stop, PyObject *values, PyObject *starts,
              PyObject *ends, PyObject *ints)
{
    PyObject *singles = singles_of(out);
    if (singles == NULL)
        return NULL;
    PyObject *shape = PyTuple_New(s->rank);
    if (shape == NULL) {
        Py_DECREF(singles);
        return NULL;
    }
    for (int d = 0; d < s->rank; d++) {
        PyObject *dim = PyLong_FromSsize_t(s->dims[d + 1]);
        if (dim == NULL) {
            Py_DECREF(shape);
            Py_DECREF(singles);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, d, dim);
    }
    int with_ints = out->integral && out->ints_ok;
    PyObject *result = Py_BuildValue("(OOOOONnOO)", values, starts, ends,
                                     out->integral ? Py_True : Py_False,
                                     with_ints ? ints : Py_None, shape, stop,
                                     PyTuple_GET_ITEM(singles, 0), PyTuple_GET_ITEM(singles, 1));
    Py_DECREF(singles);
    return result;
}

PyDoc_STRVAR(scan_tensor_doc,
"scan_tensor(text, start, limit)\n"
"    -> (values, starts, ends, integral, ints, shape, end, single, suspects) | None\n"
"\n"
"The dense tensor written as JSON at text[start] (and before limit): a number,\n"
"or nested non-empty lists of numbers, every list of a depth as long as the\n"
"others. Returns its float64 values (correctly rounded, as float() rounds),\n"
"each token's start and end offset in text, whether every token is an integer\n"
"literal, the int64 values when they all fit (else None), all as writable\n"
"bytearrays, its shape, and where its text ends (what follows is not read);\n"
"then, unless the tensor reads as int64 or float64, the values as float32 (a\n"
"bytearray) and the indices whose float32 must be decided from the text.\n"
"None for anything else (a token this does not read, an empty or ragged list,\n"
"other JSON): then guard.dataplane.codec.restjson's numpy scan, the\n"
"reference, judges the text.");

static PyObject *
scan_tensor(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &start, &end))
        return NULL;
    if (start < 0 || end > view.len || start > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "scan_tensor: start and end must lie in the text");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)view.buf;
    PyObject *arrays[4] = {NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    for (int a = 0; a < 4; a++)
        if ((arrays[a] = PyByteArray_FromStringAndSize(NULL, 0)) == NULL)
            goto done;
    Numbers out = {.integral = 1, .ints_ok = 1};
    Nesting s = {.rank = -1, .expect = 1};
    Py_ssize_t pos = start, cap = Py_MIN((end - start) / 8, 1 << 18) + 16;
    int status = SCAN_FULL;
    while (status == SCAN_FULL) {
        if (resize(arrays, &out, cap) < 0)
            goto done;
        Py_BEGIN_ALLOW_THREADS
        status = scan_tensor_text(p, &pos, end, &out, &s);
        Py_END_ALLOW_THREADS
        cap *= 2;
    }
    if (status == SCAN_FAIL)
        result = Py_NewRef(Py_None);
    else if (resize(arrays, &out, out.n) == 0)
        result = tensor_result(&out, &s, pos, arrays[0], arrays[1], arrays[2], arrays[3]);
done:
    for (int a = 0; a < 4; a++)
        Py_XDECREF(arrays[a]);
    PyBuffer_Release(&view);
    return result;
}

/* ---- peek_request: a REST predict request's signature_name and format ----
 *
 * The same walk as guard/server/rest/peek.py's peek_request(), the reference
 * (tests/server/test_rest_peek.py holds the two together): between strings,
 * brackets are counted for the nesting depth; a string at depth 1 followed by
 * ':' is a top-level key. Numbers are never read. A key or signature text
 * with an escape is left to the reference, which decodes it. */

static int
is_json_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* One past the string token opening at p (as the regex "(?:[^"\\]|\\.)*"
 * with DOTALL reads it), or NULL when it does not close. */
static const unsigned char *
string_token_end(const unsigned char *p, const unsigned char *end)
{
    for (p++; p < end; p++) {
        if (*p == '\\') {
            if (++p >= end)
                return NULL;
        }
        else if (*p == '"')
            return p + 1;
    }
    return NULL;
}

static long
depth_change(const unsigned char *p, const unsigned char *end)
{
    long d = 0;
    for (; p < end; p++)
        d += (*p == '[' || *p == '{') - (*p == ']' || *p == '}');
    return d;
}

static const unsigned char *
skip_json_ws(const unsigned char *p, const unsigned char *end)
{
    while (p < end && is_json_ws(*p))
        p++;
    return p;
}

enum { KEY_OTHER, KEY_INSTANCES, KEY_INPUTS, KEY_SIGNATURE };

static int
key_of(const unsigned char *tok, size_t n)
{
    if (n == 11 && memcmp(tok, "\"instances\"", 11) == 0)
        return KEY_INSTANCES;
    if (n == 8 && memcmp(tok, "\"inputs\"", 8) == 0)
        return KEY_INPUTS;
    if (n == 16 && memcmp(tok, "\"signature_name\"", 16) == 0)
        return KEY_SIGNATURE;
    return KEY_OTHER;
}

typedef struct {
    const unsigned char *sig, *sig_end; /* the signature's text, quotes excluded */
    int format;                         /* 0: not found, 1: row, 2: columnar */
    int complete, exceeded, undecided;
    int signature_seen; /* TF Serving reads the first signature_name (rapidjson's FindMember) */
} Peek;

/* Take in the depth-1 string quote..send; returns where to go on from. */
static const unsigned char *
peek_key(Peek *pk, const unsigned char *quote, const unsigned char *send,
         const unsigned char *end, Py_ssize_t signature_max, Py_ssize_t *key_bytes)
{
    const unsigned char *c = skip_json_ws(send, end);
    if (c >= end || *c != ':')
        return send; /* not a key */
    c = skip_json_ws(c + 1, end);
    if (memchr(quote, '\\', send - quote) != NULL) {
        pk->undecided = 1;
        return send;
    }
    *key_bytes += send - quote;
    int key = key_of(quote, send - quote);
    if (pk->format == 0 && (key == KEY_INSTANCES || key == KEY_INPUTS))
        pk->format = key == KEY_INSTANCES ? 1 : 2;
    if (key != KEY_SIGNATURE || pk->signature_seen)
        return send;
    pk->signature_seen = 1;
    if (c >= end || *c != '"')
        return send;
    const unsigned char *vend = string_token_end(c, end);
    if (vend == NULL || vend - c > signature_max)
        return send; /* not a string the reference takes: the upstream answers */
    if (memchr(c, '\\', vend - c) != NULL) {
        pk->undecided = 1;
        return send;
    }
    pk->sig = c + 1;
    pk->sig_end = vend - 1;
    return vend;
}

static void
peek_walk(Peek *pk, const unsigned char *b, const unsigned char *end, Py_ssize_t strings_max,
          Py_ssize_t key_bytes_max, Py_ssize_t signature_max)
{
    const unsigned char *pos = skip_json_ws(b, end);
    if (pos >= end || *pos != '{') {
        pk->exceeded = 0;
        return;
    }
    long depth = 1;
    Py_ssize_t key_bytes = 0;
    pos++;
    for (Py_ssize_t i = 0; i < strings_max; i++) {
        const unsigned char *quote = memchr(pos, '"', end - pos);
        depth += depth_change(pos, quote != NULL ? quote : end);
        if (depth <= 0 || quote == NULL) {
            pk->complete = depth <= 0;
            pk->exceeded = 0;
            return;
        }
        const unsigned char *send = string_token_end(quote, end);
        if (send == NULL) {
            pk->exceeded = 0;
            return;
        }
        pos = send;
        if (depth != 1)
            continue;
        pos = peek_key(pk, quote, send, end, signature_max, &key_bytes);
        if (pk->undecided)
            return;
        if (pk->sig != NULL && pk->format != 0) {
            pk->complete = 1;
            pk->exceeded = 0;
            return;
        }
        if (key_bytes > key_bytes_max)
            return;
    }
}

PyDoc_STRVAR(peek_request_doc,
"peek_request(body, strings_max, key_bytes_max, signature_max, /)\n"
"--\n\n"
"A REST predict request's signature_name (str or None), format (0: not\n"
"found, 1: instances, 2: inputs), complete and exceeded, as\n"
"guard.server.rest.peek.peek_request reads them; None where a key or the\n"
"signature is escaped, which that reference decodes.");

static PyObject *
peek_request(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t strings_max, key_bytes_max, signature_max;
    if (!PyArg_ParseTuple(args, "y*nnn", &view, &strings_max, &key_bytes_max, &signature_max))
        return NULL;
    const unsigned char *b = (const unsigned char *)view.buf;
    Peek pk = {.exceeded = 1};
    Py_BEGIN_ALLOW_THREADS
    peek_walk(&pk, b, b + view.len, strings_max, key_bytes_max, signature_max);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (pk.undecided)
        result = Py_NewRef(Py_None);
    else {
        PyObject *sig = pk.sig == NULL
            ? Py_NewRef(Py_None)
            : PyUnicode_DecodeUTF8((const char *)pk.sig, pk.sig_end - pk.sig, "replace");
        if (sig != NULL)
            result = Py_BuildValue("(NiOO)", sig, pk.format, pk.complete ? Py_True : Py_False,
                                   pk.exceeded ? Py_True : Py_False);
    }
    PyBuffer_Release(&view);
    return result;
}

/* ---- skip_value: where a JSON array or object ends ----
 *
 * restjson's reader needs the end of an output's value that is not a dense
 * numeric tensor (strings, b64 objects, booleans) without visiting its
 * elements one by one in Python: a hostile upstream's millions of short
 * strings cost seconds there. The same walk as restjson/structure.py's
 * _skip_value, the reference: strings skipped as the regex "(?:[^"\\]|\\.)*"
 * reads them, brackets matched by kind, at most SKIP_DEPTH deep. */

#define SKIP_DEPTH 512

static Py_ssize_t
skip_container(const unsigned char *b, Py_ssize_t n, Py_ssize_t i)
{
    unsigned char open[SKIP_DEPTH];
    int depth = 0;
    for (Py_ssize_t j = i; j < n; j++) {
        unsigned char c = b[j];
        if (c == '"') {
            const unsigned char *e = string_token_end(b + j, b + n);
            if (e == NULL)
                return -1;
            j = e - b - 1;
        } else if (c == '[' || c == '{') {
            if (depth == SKIP_DEPTH)
                return -1;
            open[depth++] = c;
        } else if (c == ']' || c == '}') {
            if (depth == 0 || open[--depth] != (c == ']' ? '[' : '{'))
                return -1;
            if (depth == 0)
                return j + 1;
        }
    }
    return -1;
}

PyDoc_STRVAR(skip_value_doc,
"skip_value(text, start, /)\n"
"--\n\n"
"One past the array or object opening at text[start], strings skipped and\n"
"brackets matched by kind; -1 where it does not close, is not an array or\n"
"object, or nests deeper than 512.");

static PyObject *
skip_value(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end = -1;
    if (!PyArg_ParseTuple(args, "y*n", &view, &start))
        return NULL;
    const unsigned char *b = (const unsigned char *)view.buf;
    if (start >= 0 && start < view.len && (b[start] == '[' || b[start] == '{')) {
        Py_BEGIN_ALLOW_THREADS
        end = skip_container(b, view.len, start);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(end);
}

PyDoc_STRVAR(numbers_at_most_doc,
"numbers_at_most(text, enough, /)\n"
"--\n\n"
"An upper bound on the numbers in a JSON text: its '[', ',' and ':' where\n"
"those are at most enough, else the tokens that start with '-', a digit, 'N'\n"
"or 'I' right after one of them (whitespace between), outside strings\n"
"(restjson.numbers_at_most is the reference).");

/* What each byte is to numbers_at_most: whitespace, a byte a number may
 * follow ('[', ',', ':'), a byte a number may start with, a quote. */
enum { N_WS = 1, N_AFTER = 2, N_START = 4, N_QUOTE = 8 };
static unsigned char NUMBER_CLASS[256];

static void
init_number_classes(void)
{
    NUMBER_CLASS[' '] = NUMBER_CLASS['\t'] = NUMBER_CLASS['\n'] = NUMBER_CLASS['\r'] = N_WS;
    NUMBER_CLASS['['] = NUMBER_CLASS[','] = NUMBER_CLASS[':'] = N_AFTER;
    for (const char *c = "-0123456789NI"; *c; c++)
        NUMBER_CLASS[(unsigned char)*c] = N_START;
    NUMBER_CLASS['"'] = N_QUOTE;
}

static Py_ssize_t
count_number_starts(const unsigned char *b, Py_ssize_t n)
{
    Py_ssize_t count = 0;
    unsigned after = 0; /* the last byte outside strings and whitespace may precede a number */
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned k = NUMBER_CLASS[b[i]];
        if (k & N_QUOTE) {
            const unsigned char *e = string_token_end(b + i, b + n);
            if (e == NULL)
                break; /* the rest is one string */
            i = e - b - 1;
            after = 0;
            continue;
        }
        count += after & (k >> 2);
        after = (k & N_WS) ? after : (k >> 1) & 1;
    }
    return count;
}

/* Every number follows one of these: a looser bound, 16 bytes at a time
 * where SSE2 is there (the compiler's own vectors widened every byte to 64
 * bits: 8 times slower). */
static Py_ssize_t
count_number_heads(const unsigned char *b, Py_ssize_t n)
{
    Py_ssize_t count = 0, i = 0;
#ifdef __SSE2__
    const __m128i open = _mm_set1_epi8('['), comma = _mm_set1_epi8(','), colon = _mm_set1_epi8(':');
    while (i + 16 <= n) {
        __m128i sums = _mm_setzero_si128(); /* per byte lane, at most 255 blocks */
        for (int k = 0; k < 255 && i + 16 <= n; k++, i += 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)(b + i));
            __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, open),
                                                    _mm_cmpeq_epi8(v, comma)),
                                       _mm_cmpeq_epi8(v, colon));
            sums = _mm_sub_epi8(sums, hit); /* a hit is -1 */
        }
        __m128i wide = _mm_sad_epu8(sums, _mm_setzero_si128());
        count += _mm_cvtsi128_si32(wide) + _mm_cvtsi128_si32(_mm_srli_si128(wide, 8));
    }
#endif
    for (; i < n; i++)
        count += (b[i] == '[') | (b[i] == ',') | (b[i] == ':');
    return count;
}

static PyObject *
numbers_at_most(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t enough, count;
    if (!PyArg_ParseTuple(args, "y*n", &view, &enough))
        return NULL;
    const unsigned char *b = (const unsigned char *)view.buf;
    Py_BEGIN_ALLOW_THREADS
    count = count_number_heads(b, view.len);
    if (count > enough)
        count = count_number_starts(b, view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(count);
}

/* ---- reuse_texts, row_members: the text of derived outputs in a REST body ----
 *
 * guard/dataplane/codec/restjson/ writes derived outputs as text; these two
 * do its two loops over every element of a large batch, as its Python
 * reference does them (response.py's _reused_texts, members.py's
 * _row_members; tests/dataplane/test_restjson_native.py holds the
 * two together): a derived float reuses the text of the first value in its
 * instance with the same bits, and each instance's members are joined. */

/* The index of the first of n values at pool equal bit for bit to want, or
 * -1. Blocks of eight are compared without an early exit, which the compiler
 * turns into vector compares (a top-k score is found 100 values into a row
 * of 201 on average); the block that holds it is then searched one by one. */
#define FIRST_EQUAL(name, type)                                                   \
    static inline Py_ssize_t name(const unsigned char *pool, Py_ssize_t n,       \
                                  const unsigned char *want)                     \
    {                                                                             \
        type w, v[8];                                                             \
        memcpy(&w, want, sizeof w);                                               \
        Py_ssize_t c = 0;                                                         \
        for (; c + 8 <= n; c += 8) {                                              \
            memcpy(v, pool + sizeof w * (size_t)c, sizeof v);                     \
            int any = 0;                                                          \
            for (int k = 0; k < 8; k++)                                           \
                any |= v[k] == w;                                                 \
            if (any)                                                              \
                break;                                                            \
        }                                                                         \
        for (; c < n; c++) {                                                      \
            memcpy(v, pool + sizeof w * (size_t)c, sizeof w);                     \
            if (v[0] == w)                                                        \
                return c;                                                         \
        }                                                                         \
        return -1;                                                                \
    }

FIRST_EQUAL(first_equal4, uint32_t)
FIRST_EQUAL(first_equal8, uint64_t)

static Py_ssize_t
first_equal(const unsigned char *pool, Py_ssize_t n, const unsigned char *want, Py_ssize_t width)
{
    return width == 4 ? first_equal4(pool, n, want) : first_equal8(pool, n, want);
}

typedef struct {
    Py_buffer body, starts, ends, pool, derived;
    Py_ssize_t batch, width, n, m;
} Reuse;

static int
reuse_checked(Reuse *r)
{
    if ((r->width != 4 && r->width != 8) || r->batch <= 0 || r->batch > r->pool.len) {
        PyErr_SetString(PyExc_ValueError,
                        "reuse_texts: pool and derived must hold batch rows of 4- or 8-byte values");
        return 0;
    }
    Py_ssize_t row = r->batch * r->width;
    if (r->pool.len % row || r->derived.len % row) {
        PyErr_SetString(PyExc_ValueError,
                        "reuse_texts: pool and derived must hold batch rows of 4- or 8-byte values");
        return 0;
    }
    r->n = r->pool.len / row;
    r->m = r->derived.len / row;
    Py_ssize_t tokens = r->n * r->batch * (Py_ssize_t)sizeof(int64_t);
    if (r->starts.len != tokens || r->ends.len != tokens) {
        PyErr_SetString(PyExc_ValueError, "reuse_texts: one start and one end per pool value");
        return 0;
    }
    return 1;
}

/* The text of body[start:end] for token t, checked to lie in the body. */
static PyObject *
token_text(const Reuse *r, Py_ssize_t t)
{
    int64_t s, e;
    memcpy(&s, (const char *)r->starts.buf + 8 * t, 8);
    memcpy(&e, (const char *)r->ends.buf + 8 * t, 8);
    if (s < 0 || s > e || e > r->body.len) {
        PyErr_SetString(PyExc_ValueError, "reuse_texts: a token lies outside the body");
        return NULL;
    }
    const unsigned char *text = (const unsigned char *)r->body.buf + s;
    Py_UCS4 top = 0;
    for (int64_t i = 0; i < e - s; i++)
        top |= text[i];
    PyObject *str = PyUnicode_New((Py_ssize_t)(e - s), top < 128 ? 127 : 255);
    if (str != NULL)
        memcpy(PyUnicode_1BYTE_DATA(str), text, (size_t)(e - s));
    return str; /* latin-1: one character a byte, as restjson's texts are */
}

static PyObject *
reuse_list(const Reuse *r, Py_ssize_t *missing)
{
    PyObject *list = PyList_New(r->batch * r->m);
    const unsigned char *pool = r->pool.buf, *derived = r->derived.buf;
    for (Py_ssize_t i = 0; list != NULL && i < r->batch * r->m; i++) {
        Py_ssize_t row = i / r->m;
        Py_ssize_t c = first_equal(pool + row * r->n * r->width, r->n,
                                   derived + i * r->width, r->width);
        PyObject *text = c < 0 ? Py_NewRef(Py_None) : token_text(r, row * r->n + c);
        *missing += c < 0;
        if (text == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, text);
    }
    return list;
}

PyDoc_STRVAR(reuse_texts_doc,
"reuse_texts(body, starts, ends, pool, derived, batch, width, /)\n"
"--\n\n"
"For each value of derived (batch rows of width-byte values), the text\n"
"body[starts[t]:ends[t]] of the first value t in the same row of pool with\n"
"the same bits, or None; and how many are None.");

static PyObject *
reuse_texts(PyObject *Py_UNUSED(self), PyObject *args)
{
    Reuse r;
    memset(&r, 0, sizeof r);
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*nn", &r.body, &r.starts, &r.ends, &r.pool, &r.derived,
                          &r.batch, &r.width))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t missing = 0;
    if (reuse_checked(&r)) {
        PyObject *list = reuse_list(&r, &missing);
        if (list != NULL)
            result = Py_BuildValue("(Nn)", list, missing);
    }
    PyBuffer_Release(&r.body);
    PyBuffer_Release(&r.starts);
    PyBuffer_Release(&r.ends);
    PyBuffer_Release(&r.pool);
    PyBuffer_Release(&r.derived);
    return result;
}

/* One member column: its head, each instance's texts (size of them), and
 * whether an instance's value is a list of them or the one text. */
typedef struct {
    PyObject *head, *texts;
    Py_ssize_t size;
    int bracketed;
} Column;

/* 1: the columns are well formed and every text is one byte a character;
 * 0: some text is not (the caller joins them); -1: an error is set. */
static int
columns_of(PyObject *seq, Py_ssize_t batch, Column *cols, Py_ssize_t count)
{
    for (Py_ssize_t j = 0; j < count; j++) {
        Column *c = &cols[j];
        PyObject *column = PySequence_Fast_GET_ITEM(seq, j);
        if (!PyTuple_Check(column)) {
            PyErr_SetString(PyExc_TypeError, "row_members: each column must be a tuple");
            return -1;
        }
        if (!PyArg_ParseTuple(column, "UO!np", &c->head, &PyList_Type, &c->texts, &c->size,
                              &c->bracketed))
            return -1;
        if (c->size < 0 || (!c->bracketed && c->size != 1)
            || (batch > 0 && c->size > PY_SSIZE_T_MAX / batch)
            || PyList_GET_SIZE(c->texts) != batch * c->size) {
            PyErr_SetString(PyExc_ValueError, "row_members: a column's texts do not fill batch rows");
            return -1;
        }
        if (PyUnicode_KIND(c->head) != PyUnicode_1BYTE_KIND)
            return 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(c->texts); i++) {
            PyObject *t = PyList_GET_ITEM(c->texts, i);
            if (!PyUnicode_Check(t)) {
                PyErr_SetString(PyExc_TypeError, "row_members: texts must be str");
                return -1;
            }
            if (PyUnicode_KIND(t) != PyUnicode_1BYTE_KIND)
                return 0;
        }
    }
    return 1;
}

/* Appends s to a row being measured (out NULL) or written; its length. */
static Py_ssize_t
put(PyObject *s, Py_UCS1 *out, int *ascii)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    *ascii &= PyUnicode_IS_ASCII(s);
    if (out != NULL)
        memcpy(out, PyUnicode_1BYTE_DATA(s), (size_t)n);
    return n;
}

static Py_ssize_t
row_text(const Column *cols, Py_ssize_t count, Py_ssize_t i, Py_UCS1 *out, int *ascii)
{
    Py_ssize_t n = 0;
    for (Py_ssize_t j = 0; j < count; j++) {
        const Column *c = &cols[j];
        n += put(c->head, out ? out + n : NULL, ascii);
        if (c->bracketed && out)
            out[n] = '[';
        n += c->bracketed;
        for (Py_ssize_t k = 0; k < c->size; k++) {
            if (k > 0 && out)
                memcpy(out + n, ", ", 2);
            n += k > 0 ? 2 : 0;
            n += put(PyList_GET_ITEM(c->texts, i * c->size + k), out ? out + n : NULL, ascii);
        }
        if (c->bracketed && out)
            out[n] = ']';
        n += c->bracketed;
    }
    return n;
}

static PyObject *
rows_of(const Column *cols, Py_ssize_t count, Py_ssize_t batch)
{
    PyObject *rows = PyList_New(batch);
    for (Py_ssize_t i = 0; rows != NULL && i < batch; i++) {
        int ascii = 1;
        Py_ssize_t n = row_text(cols, count, i, NULL, &ascii);
        PyObject *row = PyUnicode_New(n, ascii ? 127 : 255);
        if (row == NULL) {
            Py_CLEAR(rows);
            break;
        }
        row_text(cols, count, i, PyUnicode_1BYTE_DATA(row), &ascii);
        PyList_SET_ITEM(rows, i, row);
    }
    return rows;
}

PyDoc_STRVAR(row_members_doc,
"row_members(columns, batch, /)\n"
"--\n\n"
"Each instance's members joined, from columns of (head, texts, size,\n"
"bracketed): the head, then the instance's size texts as [a, b] or, not\n"
"bracketed, its one text. None where some text has a character past U+00FF.");

static PyObject *
row_members(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *columns;
    Py_ssize_t batch;
    if (!PyArg_ParseTuple(args, "On", &columns, &batch))
        return NULL;
    PyObject *seq = PySequence_Fast(columns, "row_members: columns must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    Column *cols = PyMem_Calloc((size_t)Py_MAX(count, 1), sizeof(Column));
    PyObject *result = NULL;
    if (cols == NULL)
        PyErr_NoMemory();
    else if (batch < 0)
        PyErr_SetString(PyExc_ValueError, "row_members: batch must not be negative");
    else {
        int ok = columns_of(seq, batch, cols, count);
        result = ok < 0 ? NULL : ok == 0 ? Py_NewRef(Py_None) : rows_of(cols, count, batch);
    }
    PyMem_Free(cols);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"walk_predict_response", walk_predict_response, METH_O, walk_doc},
    {"scan_tensor", scan_tensor, METH_VARARGS, scan_tensor_doc},
    {"peek_request", peek_request, METH_VARARGS, peek_request_doc},
    {"skip_value", skip_value, METH_VARARGS, skip_value_doc},
    {"numbers_at_most", numbers_at_most, METH_VARARGS, numbers_at_most_doc},
    {"reuse_texts", reuse_texts, METH_VARARGS, reuse_texts_doc},
    {"row_members", row_members, METH_VARARGS, row_members_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "guard.dataplane._walk",
    .m_doc = "The layout of a PredictResponse, read in place (see guard.dataplane.kernels).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__walk(void)
{
    init_classes();
    init_number_classes();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    LayoutType = PyStructSequence_NewType(&layout_desc);
    if (LayoutType == NULL || PyModule_AddObjectRef(m, "OutputLayout", (PyObject *)LayoutType) < 0)
        Py_CLEAR(m);
    return m;
}
