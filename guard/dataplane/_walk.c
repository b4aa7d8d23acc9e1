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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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

static PyMethodDef methods[] = {
    {"walk_predict_response", walk_predict_response, METH_O, walk_doc},
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
