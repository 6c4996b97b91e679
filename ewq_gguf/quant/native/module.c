/* ewq_gguf.quant._native: the native backend's encoders (kernels.h) as a Python module.

encode(type, src, dst, n_rows, n_per_row, importance) takes the addresses of contiguous buffers (torch's data_ptr(),
0 for no importance vector), as ggml_backend passes them to ggml, and releases the GIL while it runs, so that
Python threads encode disjoint rows in parallel. ISAS names the instruction sets this CPU runs, widest first;
encode() takes the first unless told otherwise (tests compare every one with ggml).

count_patterns(src, n, counts) is the entropy analysis's counting pass over 16-bit floats (analyse/entropy.py), here
because a plain C loop counts several times faster than torch's bincount, which first widens every element.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "types.h"

typedef int (*encode_fn)(int, const float *, uint8_t *, int64_t, int64_t, const float *);

int encode_rows_baseline(int, const float *, uint8_t *, int64_t, int64_t, const float *);
#if defined(__x86_64__) && defined(__GNUC__)
int encode_rows_avx2(int, const float *, uint8_t *, int64_t, int64_t, const float *);
int encode_rows_avx512(int, const float *, uint8_t *, int64_t, int64_t, const float *);
#endif

/* The instruction sets this CPU runs, widest first: the first is the one encode() takes by default. */
static struct { const char *name; encode_fn encode; } isas[3];
static int isa_count = 0;

static void find_isas(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) isas[isa_count].name = "avx512", isas[isa_count++].encode = encode_rows_avx512;
    if (__builtin_cpu_supports("avx2")) isas[isa_count].name = "avx2", isas[isa_count++].encode = encode_rows_avx2;
#endif
    isas[isa_count].name = "baseline", isas[isa_count++].encode = encode_rows_baseline;
}

static PyObject *encode(PyObject *self, PyObject *args) {
    int type;
    unsigned long long src, dst, importance;
    long long n_rows, n_per_row;
    const char *isa = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKLLK|z", &type, &src, &dst, &n_rows, &n_per_row, &importance, &isa)) return NULL;
    encode_fn chosen = isas[0].encode;
    if (isa != NULL) {
        int found = 0;
        for (int i = 0; i < isa_count && !found; ++i)
            if (strcmp(isa, isas[i].name) == 0) chosen = isas[i].encode, found = 1;
        if (!found) return PyErr_Format(PyExc_ValueError, "this CPU does not run the native encoders for %s", isa);
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = chosen(type, (const float *)(uintptr_t)src, (uint8_t *)(uintptr_t)dst, n_rows, n_per_row,
                    (const float *)(uintptr_t)importance);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_Format(PyExc_ValueError, "the native encoders do not encode ggml type %d", type);
    Py_RETURN_NONE;
}

/* Four tables, summed at the end: runs of one value would otherwise make every increment wait for the last. uint32
counts, flushed before they could overflow. */
#define COUNT_TABLES 4
#define COUNT_FLUSH (1LL << 31)

static PyObject *count_patterns(PyObject *self, PyObject *args) {
    unsigned long long src, counts;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLK", &src, &n, &counts)) return NULL;
    uint32_t *tables = calloc(COUNT_TABLES << 16, sizeof(uint32_t));
    if (tables == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    const uint16_t *values = (const uint16_t *)(uintptr_t)src;
    int64_t *total = (int64_t *)(uintptr_t)counts;
    for (long long start = 0; start < n; start += COUNT_FLUSH) {
        long long stop = n - start < COUNT_FLUSH ? n : start + COUNT_FLUSH, i = start;
        for (; i + COUNT_TABLES <= stop; i += COUNT_TABLES)
            for (int t = 0; t < COUNT_TABLES; ++t) ++tables[(t << 16) | (values[i + t] ^ 0x8000u)];
        for (; i < stop; ++i) ++tables[values[i] ^ 0x8000u];
        for (int t = 0; t < COUNT_TABLES; ++t)
            for (int pattern = 0; pattern < 1 << 16; ++pattern) total[pattern] += tables[(t << 16) | pattern];
        memset(tables, 0, (COUNT_TABLES << 16) * sizeof(uint32_t));
    }
    Py_END_ALLOW_THREADS
    free(tables);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(type, src, dst, n_rows, n_per_row, importance, isa=ISAS[0]): ggml_quantize_chunk's bytes of float32 "
     "rows at address src into dst; importance is the address of n_per_row float32 weights, or 0; isa one of ISAS."},
    {"count_patterns", count_patterns, METH_VARARGS,
     "count_patterns(src, n, counts): adds to the 65536 int64 counts at address counts how often each 16-bit pattern "
     "occurs among the n at address src, pattern p at index p ^ 0x8000 (the signed pattern + 32768)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    find_isas();
    PyObject *created = PyModule_Create(&module);
    if (created == NULL) return NULL;
    static const int types[] = ENCODED_TYPES;
    PyObject *type_numbers = PyTuple_New(sizeof types / sizeof types[0]);
    if (type_numbers == NULL) goto failed;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; ++i) PyTuple_SET_ITEM(type_numbers, i, PyLong_FromLong(types[i]));
    if (PyModule_AddObject(created, "TYPES", type_numbers) < 0) {
        Py_DECREF(type_numbers);
        goto failed;
    }
    PyObject *isa_names = PyTuple_New(isa_count);
    if (isa_names == NULL) goto failed;
    for (int i = 0; i < isa_count; ++i) PyTuple_SET_ITEM(isa_names, i, PyUnicode_FromString(isas[i].name));
    if (PyModule_AddObject(created, "ISAS", isa_names) < 0) {
        Py_DECREF(isa_names);
        goto failed;
    }
    return created;
failed:
    Py_DECREF(created);
    return NULL;
}
