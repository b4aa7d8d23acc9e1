/*
 * guard.dataplane._rank: the clean path of one output rule in a single native call.
 *
 * A loaded proxy guards each response with cold CPU caches, where every
 * distinct numpy call costs 5-20 us. For the common case (float32/float64,
 * every value finite and inside the valid range, every row summing to 1) this
 * does the range check, the row-sum check and the top-k ranking in one pass
 * per row, thresholds the values (one float64 threshold, or one per class)
 * when the rule has one, and writes the derived outputs as encoded map entries
 * (clean_rank_encode; guard/dataplane/lanes.py packs its arguments). Values
 * out of range, and rows off their sum, that the rule observes or clamps are
 * counted in the same pass and, for a clamp, repaired into a copy that the
 * ranking reads: values clamped, rows still off their sum renormalised. A
 * second entry point, row_entropy, measures each row's entropy for the
 * metrics in one vectorised pass, with no libm call per value. Whenever
 * anything else would have to be decided, or a verdict is not certain, it
 * returns None and the caller takes the numpy reference:
 * tests/dataplane/test_rank.py and the fuzzer check that both give the same
 * results, bytes and metrics.
 *
 * No numpy C API: the values come in through the buffer protocol and the
 * results go out as bytes, so the module builds against any numpy version.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* TensorFlow's wire values are little-endian, and this reads and writes them
 * in place. A big-endian build fails, and setup.py's optional build then
 * leaves the guard on its numpy path. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "guard.dataplane._rank reads little-endian values in place"
#endif

#define MAX_K 16

/* Values per block in the top-k scan (see DEFINE_SCAN). */
#define BLOCK 16

/* The largest rows x cols accepted: the byte counts below cannot overflow. */
#define MAX_VALUES (PY_SSIZE_T_MAX / 16)

/* Row sums are accumulated in double, in four interleaved partial sums. numpy
 * sums pairwise; any order of summation errs by at most (n - 1) * u * sum|x|,
 * with u = 2^-53. A row is declared inside the tolerance band (1) or outside
 * it (-1) only when its sum lies beyond the band's edge by more than twice
 * that bound, so numpy's exact test |sum - 1| <= tolerance would say the
 * same; any closer row, or one whose sum|x| overflows, is uncertain (0) and
 * goes to numpy. */
static int
row_sum_verdict(double sum, double abs_sum, Py_ssize_t n, double sum_lo, double sum_hi)
{
    if (!isfinite(abs_sum))
        return 0;
    double slack = 2.0 * (double)n * (DBL_EPSILON / 2.0) * abs_sum + 8.0 * DBL_EPSILON;
    if (sum_lo + slack <= sum && sum <= sum_hi - slack)
        return 1;
    return sum < sum_lo - slack || sum > sum_hi + slack ? -1 : 0;
}

/* How a scan treats values outside the valid range, and rows certainly off
 * their sum: any makes it decline (NONE), or, with no NaN, they are counted
 * (OBSERVE: finite values only; the values stay as they are) or counted and
 * repaired (CLAMP: +-Inf included; values clamped into the bounds, then rows
 * still off their sum renormalised). The numpy reference decides every other
 * case. */
enum { REPAIR_NONE = 0, REPAIR_OBSERVE = 1, REPAIR_CLAMP = 2 };

/* What a scan counted and repaired. `repaired` stays NULL until a row needs
 * repair; it is then a copy of every value, with each such row repaired.
 * `confidence` (CLAMP) receives each row's largest value before repair, which
 * is what the metrics' histogram reads, while the ranking reads the repaired row. */
typedef struct {
    int mode;
    Py_ssize_t below, above, inf, bad_rows;
    const void *values;
    Py_ssize_t len;
    PyObject *repaired;
    void *confidence;
} Repair;

/* Where row values starting `offset` bytes in are repaired, or NULL with an
 * exception set. */
static char *
repaired_at(Repair *rep, Py_ssize_t offset)
{
    if (rep->repaired == NULL) {
        rep->repaired = PyBytes_FromStringAndSize((const char *)rep->values, rep->len);
        if (rep->repaired == NULL)
            return NULL;
    }
    return PyBytes_AS_STRING(rep->repaired) + offset;
}

/* The largest of cols values, none NaN, in LANES independent maxima, which
 * compilers vectorise (a single running maximum they do not, without
 * fast-math). Any order gives the same value but for the sign of a zero; a
 * caller that needs the value's own bits looks for the first value equal to
 * it, as np.argmax finds it. */
#define LANES 8
#define DEFINE_PEAK(NAME, T)                                                               \
    static inline T NAME(const T *row, Py_ssize_t cols)                                    \
    {                                                                                      \
        T peak[LANES];                                                                     \
        for (int j = 0; j < LANES; j++)                                                    \
            peak[j] = -(T)INFINITY;                                                        \
        Py_ssize_t c = 0;                                                                  \
        for (; c + LANES <= cols; c += LANES)                                              \
            for (int j = 0; j < LANES; j++)                                                \
                peak[j] = row[c + j] > peak[j] ? row[c + j] : peak[j];                     \
        for (int j = 0; c < cols; c++, j++)                                                \
            peak[j] = row[c] > peak[j] ? row[c] : peak[j];                                 \
        T top = peak[0];                                                                   \
        for (int j = 1; j < LANES; j++)                                                    \
            top = peak[j] > top ? peak[j] : top;                                           \
        return top;                                                                        \
    }

/* The first of cols values equal to `top` (one of them is), a block at a time. */
#define DEFINE_FIRST(NAME, T)                                                              \
    static inline Py_ssize_t NAME(const T *row, Py_ssize_t cols, T top)                    \
    {                                                                                      \
        for (Py_ssize_t b = 0; b < cols; b += BLOCK) {                                     \
            Py_ssize_t end = b + BLOCK < cols ? b + BLOCK : cols;                          \
            int hit = 0;                                                                   \
            for (Py_ssize_t c = b; c < end; c++)                                           \
                hit |= row[c] == top;                                                      \
            for (Py_ssize_t c = b; hit && c < end; c++)                                    \
                if (row[c] == top)                                                         \
                    return c;                                                              \
        }                                                                                  \
        return 0;                                                                          \
    }

/* A row's sum, and the sum of its absolute values, in double, in four
 * interleaved partial sums (which compilers vectorise): any order will do for
 * row_sum_verdict. */
#define DEFINE_SUMS(SUM, ABS_SUM, T)                                                       \
    static inline double SUM(const T *row, Py_ssize_t cols)                                \
    {                                                                                      \
        double s[4] = {0.0, 0.0, 0.0, 0.0};                                                \
        Py_ssize_t c = 0;                                                                  \
        for (; c + 4 <= cols; c += 4)                                                      \
            for (int j = 0; j < 4; j++)                                                    \
                s[j] += (double)row[c + j];                                                \
        for (; c < cols; c++)                                                              \
            s[0] += (double)row[c];                                                        \
        return (s[0] + s[1]) + (s[2] + s[3]);                                              \
    }                                                                                      \
    static inline double ABS_SUM(const T *row, Py_ssize_t cols)                            \
    {                                                                                      \
        double s = 0.0;                                                                    \
        for (Py_ssize_t c = 0; c < cols; c++)                                              \
            s += fabs((double)row[c]);                                                     \
        return s;                                                                          \
    }

/* Count one row holding a value outside [tlo, thi] as numpy's _count does
 * (an infinity counts as infinite, not as out of range), keep its largest
 * value in *top, and with CLAMP write it clamped (np.clip: each violating
 * value becomes its bound, every other value stays as it is, -0.0 included)
 * and point *ranked at it. 1 when done, 0 when the reference must decide (a
 * NaN; an infinity without CLAMP), -1 with an exception set. Most rows of a
 * badly calibrated model come here, so each pass is one that compilers
 * vectorise: integer sums of comparisons, a PEAK, a select. The counts fit
 * 32 bits: a row is part of one message, under 2 GiB. */
#define DEFINE_REPAIR(NAME, PEAK, T)                                                       \
    static int NAME(const T *row, Py_ssize_t cols, Py_ssize_t r, T tlo, T thi, Repair *rep, \
                    const T **ranked, T *top)                                              \
    {                                                                                      \
        const T inf = (T)INFINITY;                                                         \
        uint32_t nan = 0, below = 0, above = 0, pinf = 0, ninf = 0;                        \
        for (Py_ssize_t c = 0; c < cols; c++) {                                            \
            T v = row[c];                                                                  \
            nan |= v != v;                                                                 \
            below += v < tlo;                                                              \
            above += v > thi;                                                              \
            pinf += v == inf;                                                              \
            ninf += v == -inf;                                                             \
        }                                                                                  \
        if (nan || ((pinf || ninf) && rep->mode != REPAIR_CLAMP))                          \
            return 0;                                                                      \
        rep->below += (Py_ssize_t)below - ninf;                                            \
        rep->above += (Py_ssize_t)above - pinf;                                            \
        rep->inf += (Py_ssize_t)pinf + ninf;                                               \
        *top = PEAK(row, cols);                                                            \
        if (rep->mode != REPAIR_CLAMP)                                                     \
            return 1;                                                                      \
        T *dst = (T *)repaired_at(rep, r * cols * (Py_ssize_t)sizeof(T));                  \
        if (dst == NULL)                                                                   \
            return -1;                                                                     \
        for (Py_ssize_t i = 0; i < cols; i++) {                                            \
            T v = row[i];                                                                  \
            dst[i] = v < tlo ? tlo : (v > thi ? thi : v);                                  \
        }                                                                                  \
        *ranked = dst;                                                                     \
        return 1;                                                                          \
    }

/* numpy's pairwise sum of x[i] = a[i] / peak, in double, in numpy's own
 * order (its DOUBLE_pairwise_sum, which np.sum uses along a contiguous row):
 * under 8 values one running sum from 0; up to PW_BLOCK, eight interleaved
 * sums joined as ((0+1)+(2+3))+((4+5)+(6+7)), then the rest one by one;
 * beyond, the two halves summed apart, the first a multiple of 8. A row
 * renormalised here then has the reference's bits, not just its value. */
#define PW_BLOCK 128
#define DEFINE_PAIRWISE(NAME, T)                                                           \
    static double NAME(const T *a, Py_ssize_t n, double peak)                              \
    {                                                                                      \
        if (n < 8) {                                                                       \
            double res = 0.0;                                                              \
            for (Py_ssize_t i = 0; i < n; i++)                                             \
                res += (double)a[i] / peak;                                                \
            return res;                                                                    \
        }                                                                                  \
        if (n <= PW_BLOCK) {                                                               \
            double r[8];                                                                   \
            for (int j = 0; j < 8; j++)                                                    \
                r[j] = (double)a[j] / peak;                                                \
            Py_ssize_t i = 8;                                                              \
            for (; i < n - (n % 8); i += 8)                                                \
                for (int j = 0; j < 8; j++)                                                \
                    r[j] += (double)a[i + j] / peak;                                       \
            double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])); \
            for (; i < n; i++)                                                             \
                res += (double)a[i] / peak;                                                \
            return res;                                                                    \
        }                                                                                  \
        Py_ssize_t half = n / 2;                                                           \
        half -= half % 8;                                                                  \
        return NAME(a, half, peak) + NAME(a + half, n - half, peak);                       \
    }

/* Count row r, certainly off its sum, and with CLAMP repair it as the
 * reference's _clamp does (guard/dataplane/rules.py): the row clamped (done
 * already when it held values out of range, `clamped`: *ranked points at it),
 * and if the clamped row is still certainly off its sum, divided by its peak
 * and then by the pairwise sum of that, in double, each value rounded once
 * to T at the end; a row with no positive peak or a zero sum becomes uniform.
 * *top receives the row's largest value before repair. 1 when done, 0 when
 * the clamped row's sum is uncertain (the reference decides), -1 with an
 * exception set. */
#define DEFINE_RENORM(NAME, PEAK, SUM, ABS_SUM, PAIRWISE, T)                               \
    DEFINE_PAIRWISE(PAIRWISE, T)                                                           \
    static int NAME(const T *row, Py_ssize_t cols, Py_ssize_t r, int clamped, T tlo,       \
                    double sum_lo, double sum_hi, Repair *rep, const T **ranked, T *top)   \
    {                                                                                      \
        rep->bad_rows++;                                                                   \
        if (rep->mode != REPAIR_CLAMP)                                                     \
            return 1;                                                                      \
        T *dst = (T *)*ranked;                                                             \
        if (!clamped) {                                                                    \
            *top = PEAK(row, cols);                                                        \
            dst = (T *)repaired_at(rep, r * cols * (Py_ssize_t)sizeof(T));                 \
            if (dst == NULL)                                                               \
                return -1;                                                                 \
        }                                                                                  \
        *ranked = dst;                                                                     \
        double sum = SUM(dst, cols), abs_sum = tlo >= 0 ? sum : ABS_SUM(dst, cols);        \
        int verdict = row_sum_verdict(sum, abs_sum, cols, sum_lo, sum_hi);                 \
        if (verdict >= 0)                                                                  \
            return verdict;                                                                \
        double peak = (double)PEAK(dst, cols);                                             \
        double s = peak > 0 ? 0.0 + PAIRWISE(dst, cols, peak) : 0.0;                       \
        if (s == 0) {                                                                      \
            const T uniform = (T)(1.0 / (double)cols);                                     \
            for (Py_ssize_t c = 0; c < cols; c++)                                          \
                dst[c] = uniform;                                                          \
            return 1;                                                                      \
        }                                                                                  \
        for (Py_ssize_t c = 0; c < cols; c++)                                              \
            dst[c] = (T)((double)dst[c] / peak / s);                                       \
        return 1;                                                                          \
    }

/* One value per row (a binary classifier's [N, 1]) and no sum to check: the
 * row loop below costs some 15-20 ns a row (1024x1: 19 us, measured), this
 * 0.8 us in all when every value is in range. Each row's best class is 0,
 * its score the value. */
#define DEFINE_SCAN_COLUMN(NAME, REPAIR, T)                                                \
    static int NAME(const T *values, Py_ssize_t rows, double lo, double hi,                \
                    int64_t *idx_out, T *score_out, Repair *rep)                           \
    {                                                                                      \
        const T tlo = (T)lo, thi = (T)hi;                                                  \
        int bad = 0;                                                                       \
        for (Py_ssize_t r = 0; r < rows; r++) {                                            \
            T v = values[r];                                                               \
            bad |= (v < tlo) | (v > thi) | (v != v);                                       \
        }                                                                                  \
        if (bad && rep->mode == REPAIR_NONE)                                               \
            return 0;                                                                      \
        memset(idx_out, 0, (size_t)rows * sizeof(int64_t));                                \
        memcpy(score_out, values, (size_t)rows * sizeof(T));                               \
        if (rep->confidence)                                                               \
            memcpy(rep->confidence, values, (size_t)rows * sizeof(T));                     \
        for (Py_ssize_t r = 0; bad && r < rows; r++) {                                     \
            const T *ranked = values + r;                                                  \
            T top;                                                                         \
            if (!((values[r] < tlo) | (values[r] > thi) | (values[r] != values[r])))       \
                continue;                                                                  \
            int done = REPAIR(values + r, 1, r, tlo, thi, rep, &ranked, &top);             \
            if (done <= 0)                                                                 \
                return done;                                                               \
            score_out[r] = *ranked;                                                        \
        }                                                                                  \
        return 1;                                                                          \
    }

/* One row at a time, in up to three passes over it (it sits in L1 after the
 * first). Each pass is an integer OR or a plain sum, which compilers
 * vectorise; a max over floats is not, without fast-math's reordering. The
 * range and sum are checked on the row as it came, the ranking reads it as
 * repaired (clamped, then renormalised when still off its sum). Returns 1
 * (clean, or counted and repaired as rep->mode allows), 0 (the reference
 * must decide) or -1 (an exception is set). */
#define DEFINE_SCAN(NAME, T)                                                               \
    DEFINE_PEAK(NAME##_peak, T)                                                            \
    DEFINE_FIRST(NAME##_first, T)                                                          \
    DEFINE_SUMS(NAME##_sum, NAME##_abs_sum, T)                                             \
    DEFINE_REPAIR(NAME##_repair, NAME##_peak, T)                                           \
    DEFINE_RENORM(NAME##_renorm, NAME##_peak, NAME##_sum, NAME##_abs_sum, NAME##_pairwise, T) \
    DEFINE_SCAN_COLUMN(NAME##_column, NAME##_repair, T)                                    \
    static int NAME(const T *values, Py_ssize_t rows, Py_ssize_t cols, int k, double lo,   \
                    double hi, int check_sum, double sum_lo, double sum_hi,                \
                    int64_t *idx_out, T *score_out, Repair *rep)                           \
    {                                                                                      \
        T best[MAX_K];                                                                     \
        int64_t where[MAX_K];                                                              \
        const T tlo = (T)lo, thi = (T)hi; /* exact: the caller gives bounds in T */        \
        if (cols == 1 && !check_sum)                                                       \
            return NAME##_column(values, rows, lo, hi, idx_out, score_out, rep);           \
        for (Py_ssize_t r = 0; r < rows; r++) {                                            \
            const T *row = values + r * cols, *ranked = row;                               \
            T top = 0;                                                                     \
            /* The range: NaN is caught by v != v, +-Inf lies beyond the bounds. */        \
            int bad = 0;                                                                   \
            for (Py_ssize_t c = 0; c < cols; c++) {                                        \
                T v = row[c];                                                              \
                bad |= (v < tlo) | (v > thi) | (v != v);                                   \
            }                                                                              \
            if (bad) {                                                                     \
                int done = rep->mode == REPAIR_NONE                                        \
                               ? 0                                                         \
                               : NAME##_repair(row, cols, r, tlo, thi, rep, &ranked, &top); \
                if (done <= 0)                                                             \
                    return done;                                                           \
            }                                                                              \
            if (check_sum) {                                                               \
                /* With no negative value (tlo >= 0), sum|x| is the sum itself. */         \
                double sum = NAME##_sum(row, cols);                                        \
                double abs_sum = tlo >= 0 && !bad ? sum : NAME##_abs_sum(row, cols);       \
                int verdict = row_sum_verdict(sum, abs_sum, cols, sum_lo, sum_hi);         \
                if (verdict < 0 && rep->mode != REPAIR_NONE) {                             \
                    int done =                                                             \
                        NAME##_renorm(row, cols, r, bad, tlo, sum_lo, sum_hi, rep, &ranked, \
                                      &top);                                               \
                    if (done <= 0)                                                         \
                        return done;                                                       \
                } else if (verdict <= 0)                                                   \
                    return 0;                                                              \
            }                                                                              \
            if (k == 0)                                                                    \
                continue;                                                                  \
            if (k == 1) {                                                                  \
                /* The row's maximum, then where it first is: two passes that */           \
                /* vectorise, where the insertion below compares value by value. */        \
                T m = NAME##_peak(ranked, cols);                                           \
                Py_ssize_t at = NAME##_first(ranked, cols, m);                             \
                idx_out[r] = (int64_t)at;                                                  \
                score_out[r] = ranked[at];                                                 \
                if (rep->confidence)                                                       \
                    ((T *)rep->confidence)[r] = ranked == row ? ranked[at] : top;          \
                continue;                                                                  \
            }                                                                              \
            /* Keep the k best as (value desc, index asc): a later equal value never */    \
            /* displaces an earlier one, as repeated argmax ranks them. Once k are */      \
            /* kept, a block with no value above the k-th best is skipped whole. */        \
            int filled = 0;                                                                \
            for (Py_ssize_t b = 0; b < cols; b += BLOCK) {                                 \
                Py_ssize_t end = b + BLOCK < cols ? b + BLOCK : cols;                      \
                if (filled == k) {                                                         \
                    T floor = best[k - 1];                                                 \
                    int above = 0;                                                         \
                    for (Py_ssize_t c = b; c < end; c++)                                   \
                        above |= ranked[c] > floor;                                        \
                    if (!above)                                                            \
                        continue;                                                          \
                }                                                                          \
                for (Py_ssize_t c = b; c < end; c++) {                                     \
                    T v = ranked[c];                                                       \
                    if (filled == k && !(v > best[k - 1]))                                 \
                        continue;                                                          \
                    int pos = filled < k ? filled : k - 1;                                 \
                    while (pos > 0 && v > best[pos - 1]) {                                 \
                        best[pos] = best[pos - 1];                                         \
                        where[pos] = where[pos - 1];                                       \
                        pos--;                                                             \
                    }                                                                      \
                    best[pos] = v;                                                         \
                    where[pos] = (int64_t)c;                                               \
                    if (filled < k)                                                        \
                        filled++;                                                          \
                }                                                                          \
            }                                                                              \
            memcpy(idx_out + r * k, where, (size_t)k * sizeof(int64_t));                   \
            memcpy(score_out + r * k, best, (size_t)k * sizeof(T));                        \
            if (rep->confidence)                                                           \
                ((T *)rep->confidence)[r] = ranked == row ? best[0] : top;                 \
        }                                                                                  \
        return 1;                                                                          \
    }

DEFINE_SCAN(scan_f32, float)
DEFINE_SCAN(scan_f64, double)

/* Whether the arguments describe the buffer: a C-contiguous float32 (itemsize
 * 4) or float64 (8) array of rows x cols values, and 0 <= k <= min(cols, MAX_K). */
static int
describes(const Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t rows, Py_ssize_t cols, int k)
{
    return (itemsize == 4 || itemsize == 8) && rows >= 0 && cols > 0 && k >= 0 && k <= MAX_K &&
           k <= cols && rows <= MAX_VALUES / cols && view->len == rows * cols * itemsize;
}

/* `buf` itself when its values are aligned for their type, else a copy of
 * its `len` bytes in *copy, which the caller frees with PyMem_Free; NULL with
 * an exception set. Values read in place from a response sit wherever its
 * encoder put them, and the loops here read them as float or double. */
static const void *
aligned(const void *buf, Py_ssize_t len, Py_ssize_t itemsize, void **copy)
{
    *copy = NULL;
    if ((uintptr_t)buf % (uintptr_t)itemsize == 0)
        return buf;
    *copy = PyMem_Malloc(len ? (size_t)len : 1);
    if (*copy == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(*copy, buf, (size_t)len);
    return *copy;
}

/* Allocate the k best classes and scores of each row as bytes, and run the
 * scan of `len` bytes of aligned values into them. Returns 1 when clean (or
 * counted and repaired as rep->mode allows), 0 when the caller must take its
 * general path, -1 with an exception set. */
static int
scan(const void *values, Py_ssize_t len, Py_ssize_t itemsize, Py_ssize_t rows, Py_ssize_t cols,
     int k, double lo, double hi, int check_sum, double sum_lo, double sum_hi, PyObject **idx,
     PyObject **scores, Repair *rep)
{
    *idx = PyBytes_FromStringAndSize(NULL, rows * k * (Py_ssize_t)sizeof(int64_t));
    *scores = PyBytes_FromStringAndSize(NULL, rows * k * itemsize);
    if (*idx == NULL || *scores == NULL)
        return -1;
    rep->values = values;
    rep->len = len;
    /* The GIL stays held: a response's rows take microseconds, less than
     * releasing and taking it back. */
    int clean;
    if (itemsize == 4)
        clean = scan_f32((const float *)values, rows, cols, k, lo, hi, check_sum, sum_lo, sum_hi,
                         (int64_t *)PyBytes_AS_STRING(*idx), (float *)PyBytes_AS_STRING(*scores),
                         rep);
    else
        clean = scan_f64((const double *)values, rows, cols, k, lo, hi, check_sum, sum_lo,
                         sum_hi, (int64_t *)PyBytes_AS_STRING(*idx),
                         (double *)PyBytes_AS_STRING(*scores), rep);
    rep->values = NULL;
    return clean;
}

/* ------------------------------------------------------------------ entropy */

/* ln(x) for a positive normal x with no libm call and no branch, so the map
 * loop below vectorises (setup.py builds with -fno-trapping-math, which lets
 * the compiler evaluate both sides of a select): x = 2^e * m with m in
 * [sqrt(1/2), sqrt(2)), and ln(m) = 2 atanh(s), s = (m - 1) / (m + 1),
 * |s| < 0.1716, as its series to s^9 (truncation below 1e-9). float32 only:
 * float64 outputs take the numpy reference (without a packed int64-to-double
 * conversion, SSE2 cannot vectorise the exponent's). */
#define LN2 0.69314718055994530942

static inline float
ln_f32(float x)
{
    uint32_t b;
    memcpy(&b, &x, 4);
    float e = (float)((int32_t)(b >> 23) - 127);
    uint32_t mb = (b & 0x7FFFFFu) | 0x3F800000u;
    float m;
    memcpy(&m, &mb, 4);
    float big = (float)(m > 1.41421356f);
    m = m * (1.0f - 0.5f * big);
    e += big;
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float series = 2.0f + s2 * (2.0f / 3 + s2 * (2.0f / 5 + s2 * (2.0f / 7 + s2 * (2.0f / 9))));
    return e * (float)LN2 + s * series;
}

/* A row summing to less has no entropy: its subnormal values, counted as the
 * smallest normal number, would no longer be negligible against the sum. */
#define MIN_SUM 1e-20

/* Each row in one loop of LANES independent partial sums (no reassociation
 * needed to vectorise) of the values and of v ln v (zeros count as the
 * smallest normal number, whose product with its log is 0), with an integer
 * OR that flags negative, NaN and infinite values. Each v ln v is taken in T,
 * but both sums are double: float32 running sums over a million values lost
 * up to 0.003 of the entropy (every addition rounds at the sum's magnitude);
 * double lanes cost about 20% of this loop on 1024x201 (200 -> 245 us here;
 * double products would be 35%). Then H = ln S - sum(p ln p) / S over
 * ln(cols), clipped to [0, 1], or NaN for a flagged row or a sum of 0: the
 * float64 formula within 1e-6 at any width, and
 * guard.dataplane.rules.normalized_entropy (the numpy reference) to that
 * reference's own float32 rounding: 1e-5 on 300 classes, 2e-5 on millions. */
#define DEFINE_ENTROPY(NAME, T, LN, TMAX, TMIN, ATTRIBUTES)                                \
    ATTRIBUTES static void NAME(const T *values, Py_ssize_t rows, Py_ssize_t cols,         \
                                double *out)                                               \
    {                                                                                      \
        const double norm = log((double)cols);                                             \
        for (Py_ssize_t r = 0; r < rows; r++) {                                            \
            const T *row = values + r * cols;                                              \
            double sum[LANES] = {0}, plogp[LANES] = {0};                                   \
            int flags[LANES] = {0};                                                        \
            Py_ssize_t c = 0;                                                              \
            for (; c + LANES <= cols; c += LANES)                                          \
                for (int j = 0; j < LANES; j++) {                                          \
                    T v = row[c + j];                                                      \
                    flags[j] |= !(v >= 0) | (v > TMAX);                                    \
                    sum[j] += (double)v;                                                   \
                    plogp[j] += (double)(v * LN(v > TMIN ? v : TMIN));                     \
                }                                                                          \
            for (int j = 0; c < cols; c++, j++) {                                          \
                T v = row[c];                                                              \
                flags[j] |= !(v >= 0) | (v > TMAX);                                        \
                sum[j] += (double)v;                                                       \
                plogp[j] += (double)(v * LN(v > TMIN ? v : TMIN));                         \
            }                                                                              \
            double s = 0.0, a = 0.0;                                                       \
            int bad = 0;                                                                   \
            for (int j = 0; j < LANES; j++) {                                              \
                s += sum[j];                                                               \
                a += plogp[j];                                                             \
                bad |= flags[j];                                                           \
            }                                                                              \
            double h = (log(s) - a / s) / norm;                                            \
            if (bad || !(s >= MIN_SUM) || !isfinite(h))                                    \
                h = NAN;                                                                   \
            else                                                                           \
                h = h < 0.0 ? 0.0 : (h > 1.0 ? 1.0 : h);                                   \
            out[r] = h;                                                                    \
        }                                                                                  \
    }

DEFINE_ENTROPY(entropy_f32, float, ln_f32, FLT_MAX, FLT_MIN, )

/* The same loops compiled for AVX2 and FMA (8 lanes, fused multiply-adds),
 * chosen at import when the CPU has them: about 2.5x faster than SSE2. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_AVX2_ENTROPY 1
DEFINE_ENTROPY(entropy_f32_avx2, float, ln_f32, FLT_MAX, FLT_MIN,
               __attribute__((target("avx2,fma"))))
#endif

typedef void (*entropy_fn)(const float *, Py_ssize_t, Py_ssize_t, double *);
static entropy_fn entropy_f32_best = entropy_f32;

PyDoc_STRVAR(row_entropy_doc,
"row_entropy(values, rows, cols)\n"
"--\n\n"
"Each row's normalised Shannon entropy (the row divided by its sum, over\n"
"ln(cols)), in [0, 1], as float64 bytes, of a C-contiguous float32 array of\n"
"rows x cols values, cols >= 2 (misaligned values are copied first). NaN for\n"
"a row with a negative, NaN or infinite value, or a sum below 1e-20.\n"
"guard.dataplane.rules.normalized_entropy is the numpy reference.");

static PyObject *
row_entropy(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t itemsize = 4, rows, cols;
    PyObject *out = NULL;
    void *copy = NULL;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &rows, &cols))
        return NULL;
    if (!describes(&view, itemsize, rows, cols, 0) || cols < 2) {
        PyErr_SetString(PyExc_ValueError, "row_entropy: arguments do not describe the buffer");
        goto done;
    }
    const void *values = aligned(view.buf, view.len, itemsize, &copy);
    if (values == NULL)
        goto done;
    out = PyBytes_FromStringAndSize(NULL, rows * (Py_ssize_t)sizeof(double));
    if (out == NULL)
        goto done;
    entropy_f32_best((const float *)values, rows, cols, (double *)PyBytes_AS_STRING(out));
done:
    PyMem_Free(copy);
    PyBuffer_Release(&view);
    return out;
}

/* ------------------------------------------------------------ derived outputs */

/* What one derived output holds: the best class, its score or its label per
 * row (argmax), the k best of each (top-k), or each value's 0/1 class against
 * its threshold and that class's label (threshold). */
enum {
    CLASS = 0,
    SCORE = 1,
    LABEL = 2,
    TOP_CLASS = 3,
    TOP_SCORE = 4,
    TOP_LABEL = 5,
    THRESHOLD_CLASS = 6,
    THRESHOLD_LABEL = 7,
};

static int
is_label(int what)
{
    return what == LABEL || what == TOP_LABEL || what == THRESHOLD_LABEL;
}

static int
is_score(int what)
{
    return what == SCORE || what == TOP_SCORE;
}

static Py_ssize_t
varint_len(uint64_t v)
{
    Py_ssize_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static char *
put_varint(char *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    return p;
}

typedef struct {
    const char *key_field, *head;
    Py_ssize_t key_len, head_len;
    int what;
    PyObject *labels; /* a tuple of encoded string_val fields, for LABEL/TOP_LABEL */
    Py_ssize_t raw_len, tensor_len, entry_len;
} Entry;

/* The encoded label of class c; an abstained class (-1) has the last one. */
static inline PyObject *
label_field(PyObject *labels, int64_t c)
{
    return PyTuple_GET_ITEM(labels, c < 0 ? PyTuple_GET_SIZE(labels) - 1 : (Py_ssize_t)c);
}

/* The classes (and scores) an entry reads, per row: the first of each row's
 * k ranked, all k, or every value's threshold class. */
typedef struct {
    const int64_t *idx;   /* the ranked classes, k per row */
    const int64_t *fired; /* the threshold classes, cols per row (NULL without one) */
    Py_ssize_t rows, cols;
    int k;
} Classes;

/* Where an entry's classes start, and how many it reads per row (stride apart). */
static const int64_t *
entry_classes(const Entry *e, const Classes *cl, Py_ssize_t *stride, Py_ssize_t *columns)
{
    if (e->what >= THRESHOLD_CLASS) {
        *stride = *columns = cl->cols;
        return cl->fired;
    }
    *stride = cl->k;
    *columns = e->what >= TOP_CLASS ? cl->k : 1;
    return cl->idx;
}

/* The payload of one entry's values: packed varints or raw bytes for classes
 * and scores (tensor_content when `content`), string_val fields for labels. */
static Py_ssize_t
raw_len(const Entry *e, const Classes *cl, Py_ssize_t itemsize, int content)
{
    Py_ssize_t stride, columns, n = 0;
    const int64_t *idx = entry_classes(e, cl, &stride, &columns);
    if (is_score(e->what))
        return cl->rows * columns * itemsize;
    if (!is_label(e->what) && content)
        return cl->rows * columns * 8;
    for (Py_ssize_t r = 0; r < cl->rows; r++)
        for (Py_ssize_t j = 0; j < columns; j++) {
            int64_t c = idx[r * stride + j];
            n += is_label(e->what) ? PyBytes_GET_SIZE(label_field(e->labels, c))
                                   : varint_len((uint64_t)c);
        }
    return n;
}

/* Numbers go in one length-delimited field, omitted when empty (as proto3
 * writes it); labels are already one field each. */
static Py_ssize_t
values_len(const Entry *e)
{
    if (is_label(e->what))
        return e->raw_len;
    return e->raw_len ? 1 + varint_len((uint64_t)e->raw_len) + e->raw_len : 0;
}

/* One loop per kind of payload: a generic loop that chose per value ran at
 * 10-20 ns a value (measured), mostly spills and the choice itself. */
static char *
put_classes(char *p, const int64_t *idx, Py_ssize_t rows, Py_ssize_t stride,
            Py_ssize_t columns, int content)
{
    for (Py_ssize_t r = 0; r < rows; r++) {
        const int64_t *row = idx + r * stride;
        if (content) {
            memcpy(p, row, (size_t)columns * 8);
            p += columns * 8;
            continue;
        }
        for (Py_ssize_t j = 0; j < columns; j++) {
            uint64_t c = (uint64_t)row[j];
            if (c < 0x80)
                *p++ = (char)c;
            else
                p = put_varint(p, c);
        }
    }
    return p;
}

static char *
put_labels(char *p, PyObject *labels, const int64_t *idx, Py_ssize_t rows, Py_ssize_t stride,
           Py_ssize_t columns)
{
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t j = 0; j < columns; j++) {
            PyObject *field = label_field(labels, idx[r * stride + j]);
            Py_ssize_t n = PyBytes_GET_SIZE(field);
            memcpy(p, PyBytes_AS_STRING(field), (size_t)n);
            p += n;
        }
    return p;
}

static char *
put_values(char *p, const Entry *e, const Classes *cl, const char *scores, Py_ssize_t itemsize,
           int content, char score_key)
{
    Py_ssize_t stride, columns;
    const int64_t *idx = entry_classes(e, cl, &stride, &columns);
    if (e->raw_len == 0)
        return p;
    if (is_label(e->what))
        return put_labels(p, e->labels, idx, cl->rows, stride, columns);
    if (is_score(e->what))
        *p++ = content ? 0x22 : score_key;
    else
        *p++ = content ? 0x22 : 0x52; /* tensor_content = 4, int64_val = 10 */
    p = put_varint(p, (uint64_t)e->raw_len);
    if (!is_score(e->what))
        return put_classes(p, idx, cl->rows, stride, columns, content);
    if (columns == cl->k) { /* every score, one after another */
        memcpy(p, scores, (size_t)(cl->rows * columns * itemsize));
        return p + cl->rows * columns * itemsize;
    }
    for (Py_ssize_t r = 0; r < cl->rows; r++) {
        memcpy(p, scores + r * cl->k * itemsize, (size_t)itemsize);
        p += itemsize;
    }
    return p;
}

/* Each value's class against its column's threshold: 1 where value > threshold,
 * compared in double as numpy compares float32 with a float64 threshold. With
 * one threshold for every column (`per_column` 0), thresholds[0] is it. Only
 * called on values with no NaN (clean, or repaired). */
#define DEFINE_FIRE(NAME, T)                                                               \
    static void NAME(const T *values, Py_ssize_t rows, Py_ssize_t cols,                    \
                     const double *thresholds, int per_column, int64_t *fired)             \
    {                                                                                      \
        if (!per_column) {                                                                 \
            const double t = thresholds[0];                                                \
            for (Py_ssize_t i = 0; i < rows * cols; i++)                                   \
                fired[i] = (double)values[i] > t;                                          \
            return;                                                                        \
        }                                                                                  \
        for (Py_ssize_t r = 0; r < rows; r++)                                              \
            for (Py_ssize_t c = 0; c < cols; c++)                                          \
                fired[r * cols + c] = (double)values[r * cols + c] > thresholds[c];        \
    }

DEFINE_FIRE(fire_f32, float)
DEFINE_FIRE(fire_f64, double)

/* The threshold classes of aligned values as int64 bytes, or NULL with an
 * exception set. */
static PyObject *
fire(const void *values, Py_ssize_t itemsize, Py_ssize_t rows, Py_ssize_t cols,
     const double *thresholds, int per_column)
{
    PyObject *fired = PyBytes_FromStringAndSize(NULL, rows * cols * (Py_ssize_t)sizeof(int64_t));
    if (fired == NULL)
        return NULL;
    int64_t *out = (int64_t *)PyBytes_AS_STRING(fired);
    if (itemsize == 4)
        fire_f32((const float *)values, rows, cols, thresholds, per_column, out);
    else
        fire_f64((const double *)values, rows, cols, thresholds, per_column, out);
    return fired;
}

/* Mark the predictions below `floor` (or NaN) as abstained, class -1, as the
 * reference does (guard/dataplane/rules.py): with a threshold, each value
 * whose predicted class's probability (the value for class 1, 1 - value for
 * class 0, in T) is below it; else each row whose best score is. numpy
 * compares a T array with the Python float floor in T, so the floor is
 * rounded to T first. */
#define DEFINE_ABSTAIN(NAME, T)                                                            \
    static void NAME(const T *values, Py_ssize_t n, int64_t *fired, const T *scores,       \
                     Py_ssize_t rows, int k, int64_t *idx, double floor)                    \
    {                                                                                      \
        const T f = (T)floor;                                                              \
        for (Py_ssize_t i = 0; fired && i < n; i++) {                                      \
            T confidence = fired[i] == 1 ? values[i] : (T)1 - values[i];                   \
            if (!(confidence >= f))                                                        \
                fired[i] = -1;                                                             \
        }                                                                                  \
        for (Py_ssize_t r = 0; !fired && r < rows; r++)                                    \
            if (!(scores[r * k] >= f))                                                     \
                idx[r * k] = -1;                                                           \
    }

DEFINE_ABSTAIN(abstain_f32, float)
DEFINE_ABSTAIN(abstain_f64, double)

PyDoc_STRVAR(clean_rank_encode_doc,
"clean_rank_encode(values, itemsize, rows, cols, k, lo, hi, check_sum, sum_lo, sum_hi,\n"
"                  content, score_key, entries, thresholds=None, repair=0,\n"
"                  min_confidence=nan)\n"
"--\n\n"
"Check and rank a C-contiguous float32 (itemsize 4) or float64 (8) array of\n"
"rows x cols values (misaligned values are copied first), then write the\n"
"derived outputs as encoded PredictResponse.outputs map entries, when every\n"
"value is finite and in [lo, hi] and, with check_sum, every row sum is\n"
"certainly within [sum_lo, sum_hi]; 1 <= k <= min(cols, MAX_K).\n"
"`entries` is a tuple of (key_field, head, what, labels): the entry's\n"
"encoded key field, the TensorProto's encoded dtype and shape fields, what it\n"
"holds (0 class, 1 score, 2 label, 3-5 the same for the top k, 6 each value's\n"
"0/1 threshold class, 7 its label) and, for labels, a tuple of one encoded\n"
"string_val field per class (per 0/1 for a threshold's: at least 2), then,\n"
"with min_confidence, the abstain label's.\n"
"`thresholds`, float64 bytes with one threshold per column, or a float, one\n"
"threshold for every column (no table as wide as the classes), is needed by\n"
"entries 6 and 7: a value's class is 1 where (double)value > its threshold.\n"
"Class values are written as tensor_content when `content`, else packed\n"
"int64_val; scores as tensor_content or the packed field whose one-byte key\n"
"is `score_key`. Returns (classes, scores, entries) as bytes: each row's best\n"
"class (with thresholds: every value's threshold class) and each row's best\n"
"score; None when anything would have to be counted: the caller then takes\n"
"the numpy reference.\n\n"
"With `min_confidence` (not NaN), a prediction below it abstains: its class\n"
"is -1 (with a threshold: each value's; else each row's best, the top-k's\n"
"first included) and its label the abstain label, as the reference writes\n"
"them; the classes item holds the -1 too.\n\n"
"`repair` 1 (observe) counts finite values outside [lo, hi], and rows\n"
"certainly off their sum, instead of declining; 2 (clamp) also counts +-Inf,\n"
"and derives from the values clamped into [lo, hi], with each row still\n"
"certainly off its sum renormalised as the numpy reference does. A NaN, or\n"
"a row sum that is not certainly inside or outside the band, still\n"
"declines. When anything was counted the result has a fourth item,\n"
"(repaired, below, above, inf, bad_rows): the repaired values as bytes (None\n"
"with observe) and the counts; its scores item is then each row's largest\n"
"value before repair (what the metrics read), not the derived outputs' score.");

#define MAX_ENTRIES 8

/* The first of each row's k items of `size` bytes (a new reference). */
static PyObject *
best_column(PyObject *ranked, Py_ssize_t rows, int k, Py_ssize_t size)
{
    if (k == 1)
        return Py_NewRef(ranked);
    PyObject *out = PyBytes_FromStringAndSize(NULL, rows * size);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t r = 0; r < rows; r++)
        memcpy(PyBytes_AS_STRING(out) + r * size, PyBytes_AS_STRING(ranked) + r * k * size,
               (size_t)size);
    return out;
}

/* Parse the entry specs; 0 with an exception set when one is malformed. */
static int
parse_entries(PyObject *spec, Entry *entries, Py_ssize_t cols, int thresholded, int abstaining)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(spec); i++) {
        Entry *e = &entries[i];
        PyObject *key_field, *head;
        e->labels = NULL;
        if (!PyTuple_Check(PyTuple_GET_ITEM(spec, i))) {
            PyErr_SetString(PyExc_TypeError, "clean_rank_encode: each entry is a tuple");
            return 0;
        }
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(spec, i), "SSi|O!", &key_field, &head, &e->what,
                              &PyTuple_Type, &e->labels))
            return 0;
        int label = is_label(e->what);
        /* A ranked label names a class; a threshold's label names a 0 or a 1.
         * With abstentions, the abstain label comes last. */
        Py_ssize_t wanted = (e->what == THRESHOLD_LABEL ? 2 : cols) + abstaining;
        if (e->what < CLASS || e->what > THRESHOLD_LABEL || label != (e->labels != NULL) ||
            (label && (e->what == THRESHOLD_LABEL ? PyTuple_GET_SIZE(e->labels) < wanted
                                                 : PyTuple_GET_SIZE(e->labels) != wanted)) ||
            (e->what >= THRESHOLD_CLASS && !thresholded)) {
            PyErr_SetString(PyExc_ValueError, "clean_rank_encode: bad entry spec");
            return 0;
        }
        for (Py_ssize_t j = 0; label && j < PyTuple_GET_SIZE(e->labels); j++)
            if (!PyBytes_Check(PyTuple_GET_ITEM(e->labels, j))) {
                PyErr_SetString(PyExc_TypeError, "clean_rank_encode: labels must be bytes");
                return 0;
            }
        e->key_field = PyBytes_AS_STRING(key_field);
        e->key_len = PyBytes_GET_SIZE(key_field);
        e->head = PyBytes_AS_STRING(head);
        e->head_len = PyBytes_GET_SIZE(head);
    }
    return 1;
}

/* The encoded map entries, or NULL with an exception set. */
static PyObject *
write_entries(Entry *entries, Py_ssize_t n_entries, const Classes *cl, const char *scores,
              Py_ssize_t itemsize, int content, char score_key)
{
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n_entries; i++) {
        Entry *e = &entries[i];
        e->raw_len = raw_len(e, cl, itemsize, content);
        e->tensor_len = e->head_len + values_len(e);
        e->entry_len = e->key_len + 1 + varint_len((uint64_t)e->tensor_len) + e->tensor_len;
        total += 1 + varint_len((uint64_t)e->entry_len) + e->entry_len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n_entries; i++) {
        const Entry *e = &entries[i];
        *p++ = 0x0a; /* PredictResponse.outputs = 1 */
        p = put_varint(p, (uint64_t)e->entry_len);
        memcpy(p, e->key_field, (size_t)e->key_len);
        p += e->key_len;
        *p++ = 0x12; /* the map entry's value = 2 */
        p = put_varint(p, (uint64_t)e->tensor_len);
        memcpy(p, e->head, (size_t)e->head_len);
        p += e->head_len;
        p = put_values(p, e, cl, scores, itemsize, content, score_key);
    }
    if (p != PyBytes_AS_STRING(out) + total) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_SystemError, "clean_rank_encode: size mismatch");
        return NULL;
    }
    return out;
}

/* The result's fourth item, (repaired or None, below, above, inf, bad_rows). */
static PyObject *
counted(const Repair *rep)
{
    return Py_BuildValue("(Onnnn)", rep->repaired ? rep->repaired : Py_None, rep->below,
                         rep->above, rep->inf, rep->bad_rows);
}

static PyObject *
clean_rank_encode(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t itemsize, rows, cols;
    int k, check_sum, content, score_key;
    double lo, hi, sum_lo, sum_hi, min_confidence = NAN;
    PyObject *spec, *thresholds = Py_None, *idx = NULL, *scores = NULL, *out = NULL;
    PyObject *fired = NULL, *best_idx = NULL, *best_score = NULL, *confidence = NULL;
    PyObject *counts = NULL, *result = NULL;
    Entry entries[MAX_ENTRIES];
    Repair rep = {0};
    void *copy = NULL;

    if (!PyArg_ParseTuple(args, "y*nnniddpddpiO!|Oid", &view, &itemsize, &rows, &cols, &k, &lo,
                          &hi, &check_sum, &sum_lo, &sum_hi, &content, &score_key,
                          &PyTuple_Type, &spec, &thresholds, &rep.mode, &min_confidence))
        return NULL;
    Py_ssize_t n_entries = PyTuple_GET_SIZE(spec);
    int thresholded = thresholds != Py_None;
    if (!describes(&view, itemsize, rows, cols, k) || k == 0 || n_entries > MAX_ENTRIES ||
        score_key < 0 || score_key > 0x7F || rep.mode < REPAIR_NONE || rep.mode > REPAIR_CLAMP ||
        (thresholded && !PyFloat_Check(thresholds) &&
         (!PyBytes_Check(thresholds) ||
          PyBytes_GET_SIZE(thresholds) != cols * (Py_ssize_t)sizeof(double)))) {
        PyErr_SetString(PyExc_ValueError,
                        "clean_rank_encode: arguments do not describe the buffer");
        goto done;
    }
    int abstaining = !isnan(min_confidence);
    if (!parse_entries(spec, entries, cols, thresholded, abstaining))
        goto done;
    if (rep.mode == REPAIR_CLAMP) {
        confidence = PyBytes_FromStringAndSize(NULL, rows * itemsize);
        if (confidence == NULL)
            goto done;
        rep.confidence = PyBytes_AS_STRING(confidence);
    }
    /* Aligned once for the scan and the thresholds. */
    const void *values = aligned(view.buf, view.len, itemsize, &copy);
    if (values == NULL)
        goto done;
    int clean = scan(values, view.len, itemsize, rows, cols, k, lo, hi, check_sum, sum_lo, sum_hi,
                     &idx, &scores, &rep);
    if (clean < 0)
        goto done;
    if (!clean) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    const int64_t *ix = (const int64_t *)PyBytes_AS_STRING(idx);
    Classes cl = {ix, NULL, rows, cols, k};
    if (thresholded) {
        /* One threshold for every column, or one per column, copied out of the
         * bytes: they need not be aligned for double. */
        int per_column = !PyFloat_Check(thresholds);
        double one = per_column ? 0.0 : PyFloat_AS_DOUBLE(thresholds);
        double *t = &one;
        if (per_column) {
            t = PyMem_Malloc((size_t)cols * sizeof(double));
            if (t == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(t, PyBytes_AS_STRING(thresholds), (size_t)cols * sizeof(double));
        }
        /* A clamp's classes are the repaired values', as the reference derives them. */
        fired = fire(rep.repaired ? PyBytes_AS_STRING(rep.repaired) : values, itemsize, rows,
                     cols, t, per_column);
        if (per_column)
            PyMem_Free(t);
        if (fired == NULL)
            goto done;
        cl.fired = (const int64_t *)PyBytes_AS_STRING(fired);
    }
    if (abstaining) {
        const void *checked = rep.repaired ? PyBytes_AS_STRING(rep.repaired) : values;
        int64_t *f = fired ? (int64_t *)PyBytes_AS_STRING(fired) : NULL;
        int64_t *ranked = (int64_t *)PyBytes_AS_STRING(idx);
        if (itemsize == 4)
            abstain_f32((const float *)checked, rows * cols, f,
                        (const float *)PyBytes_AS_STRING(scores), rows, k, ranked, min_confidence);
        else
            abstain_f64((const double *)checked, rows * cols, f,
                        (const double *)PyBytes_AS_STRING(scores), rows, k, ranked,
                        min_confidence);
    }
    out = write_entries(entries, n_entries, &cl, PyBytes_AS_STRING(scores), itemsize, content,
                        (char)score_key);
    if (out == NULL)
        goto done;
    /* Each row's best class (or the threshold classes) and best score, for the
     * metrics: with k = 1 the ranking is exactly that. */
    best_idx = thresholded ? Py_NewRef(fired) : best_column(idx, rows, k, 8);
    best_score = rep.repaired ? Py_NewRef(confidence) : best_column(scores, rows, k, itemsize);
    if (best_idx == NULL || best_score == NULL)
        goto done;
    if (rep.below + rep.above + rep.inf + rep.bad_rows == 0) {
        result = PyTuple_Pack(3, best_idx, best_score, out);
        goto done;
    }
    counts = counted(&rep);
    if (counts != NULL)
        result = PyTuple_Pack(4, best_idx, best_score, out, counts);
done:
    Py_XDECREF(idx);
    Py_XDECREF(scores);
    Py_XDECREF(fired);
    Py_XDECREF(best_idx);
    Py_XDECREF(best_score);
    Py_XDECREF(confidence);
    Py_XDECREF(counts);
    Py_XDECREF(rep.repaired);
    Py_XDECREF(out);
    PyMem_Free(copy);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"clean_rank_encode", clean_rank_encode, METH_VARARGS, clean_rank_encode_doc},
    {"row_entropy", row_entropy, METH_VARARGS, row_entropy_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "guard.dataplane._rank",
    .m_doc = "The clean path of an output rule in one native call (see guard.dataplane.lanes).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__rank(void)
{
#ifdef HAVE_AVX2_ENTROPY
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        entropy_f32_best = entropy_f32_avx2;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_K", MAX_K) < 0)
        Py_CLEAR(m);
    return m;
}
