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
 * scan_numbers() does the same for REST: the numbers of a tensor's JSON text,
 * read in one pass, each value rounded once (as float() rounds); a token it
 * does not read makes it return None, and guard/dataplane/codec/restjson.py's
 * numpy scan, the reference, judges the text.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const unsigned char *p, *end;
} Cur;

/* Shapes deeper than this are left to the protobuf path (the guard refuses
 * ranks above 32 there, with an error that says so). */
#define MAX_DIMS 64

/* TensorFlow's DataType values the guard reads, and the packed field of each. */
enum { DT_FLOAT = 1, DT_DOUBLE = 2, DT_HALF = 19 };

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

static int
is_separator(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == ',' || c == '[' || c == ']';
}

/* Longer tokens (and integers past int64) go to the numpy path. */
#define MAX_TOKEN 63

typedef struct {
    double *values;
    int64_t *starts, *ends, *ints;
    Py_ssize_t n;
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
        out->ints[out->n] = 0;
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

static int
scan_region(const unsigned char *p, Py_ssize_t size, Numbers *out)
{
    Py_ssize_t i = 0;
    while (i < size) {
        if (is_separator(p[i])) {
            i++;
            continue;
        }
        Py_ssize_t start = i;
        while (i < size && !is_separator(p[i]))
            i++;
        out->starts[out->n] = start;
        out->ends[out->n] = i;
        if (!scan_token(p + start, i - start, out))
            return 0;
        out->n++;
    }
    return 1;
}

/* Allocating for the tokens there are, not for the most there could be, keeps
 * the arrays small enough to stay in the allocator's reused memory. */
static Py_ssize_t
count_tokens(const unsigned char *p, Py_ssize_t size)
{
    Py_ssize_t n = 0;
    int in_token = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        int sep = is_separator(p[i]);
        n += !sep & !in_token;
        in_token = !sep;
    }
    return n;
}

PyDoc_STRVAR(scan_numbers_doc,
"scan_numbers(region) -> (values, starts, ends, integral, ints) | None\n"
"\n"
"The numbers of a REST tensor's text (only numbers and the separators\n"
"' \\t\\n\\r,[]'): float64 values (strtod, correctly rounded), each token's\n"
"start and end offset, whether every token is an integer literal, and the\n"
"int64 values when they all fit (else None), all as bytes. None when a token\n"
"is not a JSON number this reads (then guard.dataplane.codec.restjson's numpy\n"
"scan, the reference, judges it).");

static PyObject *
scan_numbers(PyObject *Py_UNUSED(self), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t most = count_tokens((const unsigned char *)view.buf, view.len);
    PyObject *values = PyBytes_FromStringAndSize(NULL, most * 8);
    PyObject *starts = PyBytes_FromStringAndSize(NULL, most * 8);
    PyObject *ends = PyBytes_FromStringAndSize(NULL, most * 8);
    PyObject *ints = PyBytes_FromStringAndSize(NULL, most * 8);
    PyObject *result = NULL;
    if (values == NULL || starts == NULL || ends == NULL || ints == NULL)
        goto done;
    Numbers out = {(double *)PyBytes_AS_STRING(values), (int64_t *)PyBytes_AS_STRING(starts),
                   (int64_t *)PyBytes_AS_STRING(ends), (int64_t *)PyBytes_AS_STRING(ints), 0, 1, 1};
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = scan_region((const unsigned char *)view.buf, view.len, &out);
    Py_END_ALLOW_THREADS
    if (!ok) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (_PyBytes_Resize(&values, out.n * 8) < 0 || _PyBytes_Resize(&starts, out.n * 8) < 0 ||
        _PyBytes_Resize(&ends, out.n * 8) < 0 || _PyBytes_Resize(&ints, out.n * 8) < 0)
        goto done;
    int with_ints = out.integral && out.ints_ok;
    result = Py_BuildValue("(OOOOO)", values, starts, ends, out.integral ? Py_True : Py_False,
                           with_ints ? ints : Py_None);
done:
    Py_XDECREF(values);
    Py_XDECREF(starts);
    Py_XDECREF(ends);
    Py_XDECREF(ints);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"walk_predict_response", walk_predict_response, METH_O, walk_doc},
    {"scan_numbers", scan_numbers, METH_O, scan_numbers_doc},
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
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    LayoutType = PyStructSequence_NewType(&layout_desc);
    if (LayoutType == NULL || PyModule_AddObjectRef(m, "OutputLayout", (PyObject *)LayoutType) < 0)
        Py_CLEAR(m);
    return m;
}
