/* pubmon._linecount: count the b"\n" of a bytes-like object, without the GIL.

   The one native piece of pubmon, and optional: tools/hatch_build.py compiles it when a C
   compiler and Python's headers are there, and pubmon.core.ring falls back to bytes.count when
   it is not importable. Why it exists (issue 16): pubmon numbers every line it relays, and
   bytes.count is a byte-at-a-time loop (~3 GB/s here); with 20 children writing 100-byte lines
   it was the whole gap to supervisord (0.65x with it, 1.22x with a build that did not count).
   This counts 16 bytes per step with SSE2 (every x86_64 has it), else 8 bytes per step in a
   portable word loop, and lets go of the GIL meanwhile, so the log writer thread runs. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static Py_ssize_t
count_newlines(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t count = 0;
#if defined(__SSE2__)
    const __m128i nl = _mm_set1_epi8('\n');
    const __m128i zero = _mm_setzero_si128();
    while (n >= 16) {
        /* Up to 255 blocks per round: each byte lane counts its matches without overflowing. */
        Py_ssize_t blocks = n / 16 > 255 ? 255 : n / 16;
        __m128i acc = zero;
        for (Py_ssize_t i = 0; i < blocks; i++) {
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            acc = _mm_sub_epi8(acc, _mm_cmpeq_epi8(v, nl)); /* a match is -1: subtract it */
            p += 16;
        }
        __m128i sums = _mm_sad_epu8(acc, zero); /* two 64-bit sums of eight lanes each */
        count += _mm_cvtsi128_si32(sums) + _mm_cvtsi128_si32(_mm_srli_si128(sums, 8));
        n -= blocks * 16;
    }
#else
    /* Eight bytes at a time: a byte of x ^ '\n'... is zero where a newline is. */
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    const uint64_t lows = 0x7f7f7f7f7f7f7f7fULL, nls = ones * '\n';
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= nls;
        /* A byte's high bit is set in t exactly when the byte is zero (no borrow between bytes). */
        uint64_t t = ~(((w & lows) + lows) | w) & highs;
        count += __builtin_popcountll(t);
        p += 8;
        n -= 8;
    }
    (void)ones;
#endif
    for (; n > 0; n--, p++) {
        count += *p == '\n';
    }
    return count;
}

PyDoc_STRVAR(count_doc,
"count(data, start, end, /) -> int\n\n"
"How many b\"\\n\" data[start:end] holds, as data.count(b\"\\n\", start, end) (start and end\n"
"clamped the same way), counted without the GIL.");

static PyObject *
count(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "count() takes exactly 3 arguments (data, start, end)");
        return NULL;
    }
    Py_ssize_t start = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t end = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (end == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    Py_ssize_t len = view.len;
    /* Clamp as slicing does. */
    if (start < 0) {
        start = start + len < 0 ? 0 : start + len;
    }
    if (end < 0) {
        end = end + len < 0 ? 0 : end + len;
    }
    if (end > len) {
        end = len;
    }
    Py_ssize_t found = 0;
    if (start < end) {
        const unsigned char *p = (const unsigned char *)view.buf + start;
        Py_ssize_t n = end - start;
        if (n >= 4096) {
            Py_BEGIN_ALLOW_THREADS
            found = count_newlines(p, n);
            Py_END_ALLOW_THREADS
        }
        else {
            found = count_newlines(p, n);
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(found);
}

static PyMethodDef methods[] = {
    {"count", (PyCFunction)(void (*)(void))count, METH_FASTCALL, count_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pubmon._linecount",
    .m_doc = "Count newlines without the GIL (optional; pubmon.core.ring falls back to bytes.count).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__linecount(void)
{
    return PyModuleDef_Init(&module);
}
