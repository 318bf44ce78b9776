/*
 * The CPU engine's serving head (cpu.py's FastHead), compiled: from a batch's texts, their
 * words and the encoder's word cache to the batch's logits in one call (words never seen go
 * to the encoder's `learn` once per batch). The second half of this file is the WordPiece
 * search that learning uses for plain ASCII words (wordpiece.py's AsciiWordPiece).
 *
 * Why C: with numpy a batch costs ~100 array calls whatever its size (tokens, n-gram hashes,
 * phrase lookups, the gather and its segment sums), ~0.4 ms before the first prompt is
 * counted, and ~1 ms for the handful of prompts a worker takes per batch at 1,000 req/s.
 * Here each prompt is one pass over its word entries and its characters.
 *
 * FastHead's numpy path stays the reference and the fallback where no compiler was found:
 * tests/unit/test_cpu_head.py checks both give the same logits (up to float rounding) on the
 * corpus and on random text. The parts are added in the numpy path's order (each part's rows
 * summed, scaled, then the parts one after another).
 *
 * Per text, with the table rows named by cpu.py (`lookup` maps a bag column to its row):
 *   dense  max over the kept tokens' projected rows @ w_peak, + (log1p stats @ w_stats + bias)
 *   part 0 token rows (mean pooling)         scale 1 / max(tokens, 1)
 *   part 1 lookup[token]                     scale 1 / sqrt(max(tokens + bigrams, 1))
 *   part 2 lookup[bigram_offset + bucket]    same scale
 *   part 3.. lookup[char_offset + bucket] for each char n-gram size, scale 1/sqrt(all n-grams)
 *   word   lookup[word_offset + column]      scale 1 / sqrt(max(word columns, 1))
 *   phrase lookup[phrase_offset + concept]   same scale
 * Every index is checked, on load (the tables) or as it is read (the entries).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define HEAD_CAPSULE "router_worker.cpu_head"
#define MAX_SIZES 8
#define MAX_WIDTH 64
#define MAX_DIM 1024
/* rows ahead that a gather asks the cache for */
#define PREFETCH 16

enum { TABLE, PROJECTED, W_PEAK, W_STATS, BIAS, LOOKUP, KEYS, STARTS, CONCEPTS, N_BUFFERS };

static const char *buffer_names[N_BUFFERS] = {
    "table", "projected", "w_peak", "w_stats", "bias", "lookup", "keys", "starts", "concepts",
};
/* item sizes: float32 tables, int32 lookup, uint64 phrase keys, int64 phrase lists */
static const Py_ssize_t item_sizes[N_BUFFERS] = {4, 4, 4, 4, 4, 4, 8, 8, 8};

typedef struct {
    Py_buffer views[N_BUFFERS];
    int held;
    Py_ssize_t rows, width, dim, vocab, n_lookup, n_keys, n_concepts;
    long long unk, max_tokens;
    long long bigram_offset, bigram_buckets, char_offset, char_buckets;
    long long word_offset, phrase_offset, max_phrase_words;
    int n_sizes;
    int sizes[MAX_SIZES];
    uint64_t char_prime, hash_mult, phrase_mult;
    int shift;
} Head;

static void
head_free(PyObject *capsule)
{
    Head *head = PyCapsule_GetPointer(capsule, HEAD_CAPSULE);
    if (head == NULL) {
        return;
    }
    for (int i = 0; i < head->held; i++) {
        PyBuffer_Release(&head->views[i]);
    }
    PyMem_Free(head);
}

static const float *
f32(const Head *head, int which)
{
    return (const float *)head->views[which].buf;
}

static Py_ssize_t
count_of(const Head *head, int which)
{
    return head->views[which].len / item_sizes[which];
}

/* Everything `logits` indexes without a check must be in bounds: checked here, once. */
static int
head_check(Head *head)
{
    Py_ssize_t width = head->width, dim = head->dim;
    if (width < 1 || width > MAX_WIDTH || dim < 1 || dim > MAX_DIM) {
        PyErr_Format(PyExc_ValueError, "width %zd or dim %zd out of range", width, dim);
        return -1;
    }
    if (count_of(head, TABLE) % width || count_of(head, PROJECTED) % dim) {
        PyErr_SetString(PyExc_ValueError, "table or projected is not whole rows");
        return -1;
    }
    head->rows = count_of(head, TABLE) / width;
    if (head->vocab < 1 || head->vocab > head->rows ||
        count_of(head, PROJECTED) / dim < head->vocab) {
        PyErr_SetString(PyExc_ValueError, "the vocabulary exceeds the table or projected rows");
        return -1;
    }
    if (count_of(head, W_PEAK) != dim * width || count_of(head, W_STATS) != 3 * width ||
        count_of(head, BIAS) != width) {
        PyErr_SetString(PyExc_ValueError, "w_peak, w_stats or bias has the wrong size");
        return -1;
    }
    head->n_lookup = count_of(head, LOOKUP);
    const int32_t *lookup = (const int32_t *)head->views[LOOKUP].buf;
    for (Py_ssize_t i = 0; i < head->n_lookup; i++) {
        if (lookup[i] < 0 || lookup[i] >= head->rows) {
            PyErr_Format(PyExc_ValueError, "lookup[%zd] = %d is not a table row", i, lookup[i]);
            return -1;
        }
    }
    if (head->vocab > head->n_lookup) {
        PyErr_SetString(PyExc_ValueError, "lookup is shorter than the vocabulary");
        return -1;
    }
    head->n_keys = count_of(head, KEYS);
    head->n_concepts = count_of(head, CONCEPTS);
    if (count_of(head, STARTS) != head->n_keys + 1) {
        PyErr_SetString(PyExc_ValueError, "starts must hold one more entry than keys");
        return -1;
    }
    const uint64_t *keys = (const uint64_t *)head->views[KEYS].buf;
    const int64_t *starts = (const int64_t *)head->views[STARTS].buf;
    const int64_t *concepts = (const int64_t *)head->views[CONCEPTS].buf;
    for (Py_ssize_t k = 0; k < head->n_keys; k++) {
        if ((k && keys[k - 1] >= keys[k]) || starts[k] < 0 || starts[k] > starts[k + 1]) {
            PyErr_SetString(PyExc_ValueError, "phrase keys or starts are not sorted");
            return -1;
        }
    }
    if (starts[0] != 0 || starts[head->n_keys] != head->n_concepts) {
        PyErr_SetString(PyExc_ValueError, "phrase starts do not cover the concepts");
        return -1;
    }
    for (Py_ssize_t c = 0; c < head->n_concepts; c++) {
        long long column = head->phrase_offset + concepts[c];
        if (concepts[c] < 0 || column >= head->n_lookup) {
            PyErr_SetString(PyExc_ValueError, "a phrase concept is outside the bag");
            return -1;
        }
    }
    long long offsets[] = {head->bigram_offset + head->bigram_buckets,
                           head->char_offset + head->char_buckets};
    for (int i = 0; i < 2; i++) {
        if (offsets[i] > head->n_lookup) {
            PyErr_SetString(PyExc_ValueError, "a hashed block runs past the bag");
            return -1;
        }
    }
    if (head->bigram_offset < 0 || head->char_offset < 0 || head->word_offset < 0 ||
        head->bigram_buckets < 1 || head->char_buckets < 1 || head->shift < 0 ||
        head->shift > 63 || head->max_tokens < 0 || head->max_phrase_words < 1) {
        PyErr_SetString(PyExc_ValueError, "a head parameter is out of range");
        return -1;
    }
    return 0;
}

/* load_head(arrays: [table, projected, w_peak, w_stats, bias, lookup, keys, starts, concepts],
 *           params: tuple, sizes: tuple) -> capsule
 * The buffers are held (not copied) for the capsule's life. */
static PyObject *
load_head(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *arrays, *params, *sizes;
    if (!PyArg_ParseTuple(args, "OO!O!:load_head", &arrays, &PyTuple_Type, &params,
                          &PyTuple_Type, &sizes)) {
        return NULL;
    }
    PyObject *views = PySequence_Fast(arrays, "arrays must be a sequence of buffers");
    if (views == NULL) {
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(views) != N_BUFFERS) {
        PyErr_Format(PyExc_ValueError, "load_head takes %d arrays", N_BUFFERS);
        Py_DECREF(views);
        return NULL;
    }
    Head *head = PyMem_Calloc(1, sizeof(Head));
    if (head == NULL) {
        Py_DECREF(views);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < N_BUFFERS; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(views, i), &head->views[i],
                               PyBUF_C_CONTIGUOUS) < 0) {
            goto fail;
        }
        head->held = i + 1;
        if (head->views[i].itemsize != item_sizes[i]) {
            PyErr_Format(PyExc_ValueError, "%s must hold %zd-byte items, not %zd",
                         buffer_names[i], item_sizes[i], head->views[i].itemsize);
            goto fail;
        }
    }
    unsigned long long char_prime, hash_mult, phrase_mult;
    if (!PyArg_ParseTuple(params,
                          "nnnLLLLLLLLLKKKi:load_head params", &head->width, &head->dim,
                          &head->vocab, &head->unk, &head->max_tokens, &head->bigram_offset,
                          &head->bigram_buckets, &head->char_offset, &head->char_buckets,
                          &head->word_offset, &head->phrase_offset, &head->max_phrase_words,
                          &char_prime, &hash_mult, &phrase_mult, &head->shift)) {
        goto fail;
    }
    head->char_prime = char_prime;
    head->hash_mult = hash_mult;
    head->phrase_mult = phrase_mult;
    if (PyTuple_GET_SIZE(sizes) > MAX_SIZES) {
        PyErr_SetString(PyExc_ValueError, "sizes must be a tuple of at most 8 n-gram sizes");
        goto fail;
    }
    head->n_sizes = (int)PyTuple_GET_SIZE(sizes);
    for (int s = 0; s < head->n_sizes; s++) {
        long size = PyLong_AsLong(PyTuple_GET_ITEM(sizes, s));
        if (size < 1 || size > 64) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "an n-gram size must be in 1..64");
            }
            goto fail;
        }
        head->sizes[s] = (int)size;
    }
    if (head_check(head) < 0) {
        goto fail;
    }
    PyObject *capsule = PyCapsule_New(head, HEAD_CAPSULE, head_free);
    if (capsule != NULL) {
        Py_DECREF(views);
        return capsule;
    }
fail:
    Py_DECREF(views);
    for (int i = 0; i < head->held; i++) {
        PyBuffer_Release(&head->views[i]);
    }
    PyMem_Free(head);
    return NULL;
}

/* A growable array of table rows (or token ids). */
typedef struct {
    int32_t *data;
    Py_ssize_t size, cap;
} Rows;

static int
rows_reserve(Rows *rows, Py_ssize_t more)
{
    if (rows->size + more <= rows->cap) {
        return 0;
    }
    Py_ssize_t cap = rows->cap ? rows->cap : 256;
    while (cap < rows->size + more) {
        cap *= 2;
    }
    int32_t *data = PyMem_Realloc(rows->data, (size_t)cap * sizeof(int32_t));
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    rows->data = data;
    rows->cap = cap;
    return 0;
}

static inline int
rows_push(Rows *rows, int32_t row)
{
    if (rows->size == rows->cap && rows_reserve(rows, 1) < 0) {
        return -1;
    }
    rows->data[rows->size++] = row;
    return 0;
}

/* The sum of the table's `rows`, into `sum` (float32, as numpy leaves it).
 *
 * The rows are gathered first and summed here, in separate loops: the loads of a loop that
 * only loads are independent, so the CPU keeps many cache misses in flight (the table is ~11 MB,
 * beyond L2), where a loop that also walked the Python entries or hashed characters between
 * them waited for most one at a time. The sum runs in double: numpy sums pairwise, and a
 * float32 running sum over a long prompt's ~1,500 n-gram rows drifted ~1e-4 from it. */
static void
sum_rows(const Head *head, const Rows *rows, float *sum)
{
    const float *table = f32(head, TABLE);
    Py_ssize_t width = head->width;
    double acc[MAX_WIDTH] = {0};
    for (Py_ssize_t i = 0; i < rows->size; i++) {
        if (i + PREFETCH < rows->size) {
            __builtin_prefetch(table + (Py_ssize_t)rows->data[i + PREFETCH] * width);
        }
        const float *row = table + (Py_ssize_t)rows->data[i] * width;
        for (Py_ssize_t j = 0; j < width; j++) {
            acc[j] += row[j];
        }
    }
    for (Py_ssize_t j = 0; j < width; j++) {
        sum[j] = (float)acc[j];
    }
}

/* out += part * scale, as numpy's float32 `out += sums * scale` */
static inline void
add_scaled(float *out, const float *part, float scale, Py_ssize_t width)
{
    for (Py_ssize_t j = 0; j < width; j++) {
        out[j] += part[j] * scale;
    }
}

/* cpu.py's _inv_sqrt in float32 */
static inline float
inv_sqrt(float count)
{
    return 1.0f / sqrtf(count > 1.0f ? count : 1.0f);
}

static Py_ssize_t
find_key(const uint64_t *keys, Py_ssize_t n, uint64_t key)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < key) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo < n && keys[lo] == key ? lo : -1;
}

/* Per-call scratch: one text's rows of each part, and its phrase word ids. */
typedef struct {
    Rows tokens, unigram, bigram, words, phrases, chars[MAX_SIZES];
    int64_t *word_ids;
    float peak[MAX_DIM], part[MAX_WIDTH];
} Scratch;

static void
scratch_free(Scratch *scratch)
{
    Rows *all[] = {&scratch->tokens, &scratch->unigram, &scratch->bigram, &scratch->words,
                   &scratch->phrases};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        PyMem_Free(all[i]->data);
    }
    for (int s = 0; s < MAX_SIZES; s++) {
        PyMem_Free(scratch->chars[s].data);
    }
    PyMem_Free(scratch->word_ids);
}

/* One text's word entries: kept tokens (word pieces that are not unknown, within the first
 * max_tokens pieces), the rows of its word-level columns and its phrase word ids. */
static int
walk_words(const Head *head, PyObject *const *entries, Py_ssize_t n_words, Scratch *scratch)
{
    const int32_t *lookup = (const int32_t *)head->views[LOOKUP].buf;
    long long vocab = head->vocab, position = 0;
    for (Py_ssize_t w = 0; w < n_words; w++) {
        PyObject *entry = entries[w];
        if (!PyTuple_Check(entry)) {
            PyErr_SetString(PyExc_TypeError, "a word entry must be a tuple of ints");
            return -1;
        }
        scratch->word_ids[w] = 0;
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(entry); k++) {
            long long e = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, k));
            if (e == -1 && PyErr_Occurred()) {
                return -1;
            }
            if (e < 0) {  /* the word's id among phrase words */
                scratch->word_ids[w] = -e;
            }
            else if (e >= vocab) {  /* a word-level column */
                long long column = head->word_offset + (e - vocab);
                if (column >= head->n_lookup) {
                    PyErr_Format(PyExc_ValueError, "word column %lld is outside the bag", e);
                    return -1;
                }
                if (rows_push(&scratch->words, lookup[column]) < 0) {
                    return -1;
                }
            }
            else if (position++ < head->max_tokens && e != head->unk) {  /* a kept piece */
                if (rows_push(&scratch->tokens, (int32_t)e) < 0) {
                    return -1;
                }
            }
        }
    }
    return 0;
}

/* Rows of the unigram and bigram parts from the kept tokens; their max pooling. */
static int
token_rows(const Head *head, Scratch *scratch)
{
    const int32_t *lookup = (const int32_t *)head->views[LOOKUP].buf;
    const float *projected = f32(head, PROJECTED);
    const Rows *tokens = &scratch->tokens;
    Py_ssize_t n = tokens->size, dim = head->dim;
    if (rows_reserve(&scratch->unigram, n) < 0 || rows_reserve(&scratch->bigram, n) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        scratch->unigram.data[i] = lookup[tokens->data[i]];
    }
    scratch->unigram.size = n;
    for (Py_ssize_t i = 1; i < n; i++) {
        uint64_t pair = (uint64_t)tokens->data[i - 1] * (uint64_t)head->vocab +
                        (uint64_t)tokens->data[i];
        long long bucket =
            (long long)((pair * head->hash_mult) >> head->shift) % head->bigram_buckets;
        scratch->bigram.data[i - 1] = lookup[head->bigram_offset + bucket];
    }
    scratch->bigram.size = n > 1 ? n - 1 : 0;
    for (Py_ssize_t d = 0; d < dim; d++) {
        scratch->peak[d] = n ? -INFINITY : 0.0f;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH / 4 < n) {  /* a row spans several cache lines: fewer rows ahead */
            const float *ahead = projected + (Py_ssize_t)tokens->data[i + PREFETCH / 4] * dim;
            for (Py_ssize_t d = 0; d < dim; d += 16) {
                __builtin_prefetch(ahead + d);
            }
        }
        const float *row = projected + (Py_ssize_t)tokens->data[i] * dim;
        for (Py_ssize_t d = 0; d < dim; d++) {
            scratch->peak[d] = row[d] > scratch->peak[d] ? row[d] : scratch->peak[d];
        }
    }
    return 0;
}

/* Rows of the concepts of the phrases among one text's words (runs of 2..max_phrase_words
 * words that all belong to some phrase). */
static int
phrase_rows(const Head *head, Py_ssize_t n_words, Scratch *scratch)
{
    if (!head->n_keys) {
        return 0;
    }
    const int32_t *lookup = (const int32_t *)head->views[LOOKUP].buf;
    const uint64_t *keys = (const uint64_t *)head->views[KEYS].buf;
    const int64_t *starts = (const int64_t *)head->views[STARTS].buf;
    const int64_t *concepts = (const int64_t *)head->views[CONCEPTS].buf;
    const int64_t *ids = scratch->word_ids;
    for (long long n = 2; n <= head->max_phrase_words; n++) {
        for (Py_ssize_t p = 0; p + n <= n_words; p++) {
            uint64_t h = (uint64_t)ids[p];
            int valid = ids[p] > 0;
            for (long long k = 1; k < n && valid; k++) {
                valid = ids[p + k] > 0;
                h = h * head->phrase_mult + (uint64_t)ids[p + k];
            }
            Py_ssize_t at = valid ? find_key(keys, head->n_keys, h) : -1;
            for (int64_t c = at < 0 ? 0 : starts[at]; at >= 0 && c < starts[at + 1]; c++) {
                if (rows_push(&scratch->phrases, lookup[head->phrase_offset + concepts[c]]) < 0) {
                    return -1;
                }
            }
        }
    }
    return 0;
}

/* Rows of the hashed char n-grams of one lower-cased text (NUL counts as a space). */
static int
char_rows(const Head *head, PyObject *text, Scratch *scratch)
{
    const int32_t *lookup = (const int32_t *)head->views[LOOKUP].buf;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t length = PyUnicode_GET_LENGTH(text);
    for (int s = 0; s < head->n_sizes; s++) {
        int size = head->sizes[s];
        Rows *rows = &scratch->chars[s];
        Py_ssize_t count = length - size + 1;
        rows->size = 0;
        if (count <= 0) {
            continue;
        }
        if (rows_reserve(rows, count) < 0) {
            return -1;
        }
        for (Py_ssize_t p = 0; p < count; p++) {
            uint64_t h = 0;
            for (int k = 0; k < size; k++) {
                Py_UCS4 ch = PyUnicode_READ(kind, data, p + k);
                h = (k ? h * head->char_prime : 0) + (ch ? ch : ' ');
            }
            rows->data[p] = (int32_t)((long long)((h * head->hash_mult) >> head->shift) %
                                      head->char_buckets);
        }
        for (Py_ssize_t p = 0; p < count; p++) {
            rows->data[p] = lookup[head->char_offset + rows->data[p]];
        }
        rows->size = count;
    }
    return 0;
}

static Py_ssize_t
count_newlines(PyObject *text)
{
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t length = PyUnicode_GET_LENGTH(text), lines = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        lines += PyUnicode_READ(kind, data, i) == '\n';
    }
    return lines;
}

/* out += scale * (the sum of the part's rows) */
static void
add_part(const Head *head, const Rows *rows, float scale, Scratch *scratch, float *out)
{
    if (!rows->size) {  /* numpy adds nothing for an empty part either */
        return;
    }
    sum_rows(head, rows, scratch->part);
    add_scaled(out, scratch->part, scale, head->width);
}

/* One text's logits into `out` (width floats). */
static int
text_logits(const Head *head, PyObject *text, PyObject *lowered, PyObject *const *entries,
            Py_ssize_t n_words, Scratch *scratch, float *out)
{
    Py_ssize_t width = head->width, dim = head->dim;
    scratch->tokens.size = scratch->words.size = scratch->phrases.size = 0;
    if (walk_words(head, entries, n_words, scratch) < 0 ||
        token_rows(head, scratch) < 0 || phrase_rows(head, n_words, scratch) < 0 ||
        char_rows(head, lowered, scratch) < 0) {
        return -1;
    }
    Py_ssize_t kept = scratch->tokens.size, grams = 0;
    const float *w_peak = f32(head, W_PEAK), *w_stats = f32(head, W_STATS), *bias = f32(head, BIAS);
    float stats[3] = {log1pf((float)kept), log1pf((float)PyUnicode_GET_LENGTH(text)),
                      log1pf((float)count_newlines(text))};
    for (Py_ssize_t j = 0; j < width; j++) {
        float peak = 0.0f, side = 0.0f;
        for (Py_ssize_t d = 0; d < dim; d++) {
            peak += scratch->peak[d] * w_peak[d * width + j];
        }
        for (int k = 0; k < 3; k++) {
            side += stats[k] * w_stats[k * width + j];
        }
        out[j] = peak + (side + bias[j]);
    }
    float token_scale = inv_sqrt((float)kept + (float)scratch->bigram.size);
    float word_scale = inv_sqrt((float)scratch->words.size);
    for (int s = 0; s < head->n_sizes; s++) {
        grams += scratch->chars[s].size;
    }
    add_part(head, &scratch->tokens, (float)(1.0 / (double)(kept > 1 ? kept : 1)), scratch,
             out);
    add_part(head, &scratch->unigram, token_scale, scratch, out);
    add_part(head, &scratch->bigram, token_scale, scratch, out);
    for (int s = 0; s < head->n_sizes; s++) {
        add_part(head, &scratch->chars[s], inv_sqrt((float)grams), scratch, out);
    }
    add_part(head, &scratch->words, word_scale, scratch, out);
    add_part(head, &scratch->phrases, word_scale, scratch, out);
    return 0;
}

/* The cache entry of every word, in order (owned references). Words missing from `cache` go
 * to `learn` in one call (a list, in order of appearance, repeats included), which returns a
 * dict holding an entry for each. Entries are referenced before `learn` runs: it may clear the
 * cache when it is full. Returns the number of words, or -1 with an exception set. */
static Py_ssize_t
resolve_entries(PyObject *words, PyObject *cache, PyObject *learn, PyObject ***found)
{
    Py_ssize_t n = PyList_GET_SIZE(words), total = 0, k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *text_words = PyList_GET_ITEM(words, i);
        if (!PyList_Check(text_words)) {
            PyErr_SetString(PyExc_TypeError, "words must hold one list of str per text");
            return -1;
        }
        total += PyList_GET_SIZE(text_words);
    }
    PyObject **entries = PyMem_Calloc((size_t)(total ? total : 1), sizeof(PyObject *));
    if (entries == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *missing = NULL, *fresh = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *text_words = PyList_GET_ITEM(words, i);
        for (Py_ssize_t w = 0; w < PyList_GET_SIZE(text_words); w++, k++) {
            PyObject *word = PyList_GET_ITEM(text_words, w);
            PyObject *entry = PyDict_GetItemWithError(cache, word);
            if (entry != NULL) {
                entries[k] = Py_NewRef(entry);
                continue;
            }
            if (PyErr_Occurred() || (missing == NULL && (missing = PyList_New(0)) == NULL) ||
                PyList_Append(missing, word) < 0) {
                goto fail;
            }
        }
    }
    if (missing != NULL) {
        fresh = PyObject_CallOneArg(learn, missing);
        if (fresh == NULL) {
            goto fail;
        }
        if (!PyDict_Check(fresh)) {
            PyErr_SetString(PyExc_TypeError, "learn must return a dict of word entries");
            goto fail;
        }
        k = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *text_words = PyList_GET_ITEM(words, i);
            for (Py_ssize_t w = 0; w < PyList_GET_SIZE(text_words); w++, k++) {
                if (entries[k] != NULL) {
                    continue;
                }
                PyObject *entry = PyDict_GetItemWithError(fresh, PyList_GET_ITEM(text_words, w));
                if (entry == NULL) {
                    if (!PyErr_Occurred()) {
                        PyErr_SetString(PyExc_KeyError, "learn returned no entry for a word");
                    }
                    goto fail;
                }
                entries[k] = Py_NewRef(entry);
            }
        }
    }
    Py_XDECREF(missing);
    Py_XDECREF(fresh);
    *found = entries;
    return total;
fail:
    for (Py_ssize_t j = 0; j < total; j++) {
        Py_XDECREF(entries[j]);
    }
    PyMem_Free(entries);
    Py_XDECREF(missing);
    Py_XDECREF(fresh);
    return -1;
}

/* logits(head, texts, lowered, words, cache, learn, out) -> None */
static PyObject *
logits(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *capsule, *texts, *lowered, *words, *cache, *learn;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "OO!O!O!O!Ow*:logits", &capsule, &PyList_Type, &texts,
                          &PyList_Type, &lowered, &PyList_Type, &words, &PyDict_Type, &cache,
                          &learn, &out)) {
        return NULL;
    }
    PyObject *result = NULL, **entries = NULL;
    Py_ssize_t total = 0;
    Scratch *scratch = NULL;
    Head *head = PyCapsule_GetPointer(capsule, HEAD_CAPSULE);
    if (head == NULL) {
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(texts), most = 0;
    if (PyList_GET_SIZE(lowered) != n || PyList_GET_SIZE(words) != n) {
        PyErr_SetString(PyExc_ValueError, "texts, lowered and words differ in length");
        goto done;
    }
    if (out.len != n * head->width * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "out must hold len(texts) rows of float32 logits");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_Check(PyList_GET_ITEM(texts, i)) ||
            !PyUnicode_Check(PyList_GET_ITEM(lowered, i))) {
            PyErr_SetString(PyExc_TypeError, "texts and lowered must hold str");
            goto done;
        }
    }
    total = resolve_entries(words, cache, learn, &entries);
    if (total < 0) {
        total = 0;
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t count = PyList_GET_SIZE(PyList_GET_ITEM(words, i));
        most = count > most ? count : most;
    }
    scratch = PyMem_Calloc(1, sizeof(Scratch));
    if (scratch == NULL ||
        (scratch->word_ids = PyMem_Malloc((size_t)(most ? most : 1) * sizeof(int64_t))) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t first = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t count = PyList_GET_SIZE(PyList_GET_ITEM(words, i));
        if (text_logits(head, PyList_GET_ITEM(texts, i), PyList_GET_ITEM(lowered, i),
                        entries + first, count, scratch,
                        (float *)out.buf + i * head->width) < 0) {
            goto done;
        }
        first += count;
    }
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t j = 0; j < total; j++) {
        Py_XDECREF(entries[j]);
    }
    PyMem_Free(entries);
    if (scratch != NULL) {
        scratch_free(scratch);
        PyMem_Free(scratch);
    }
    PyBuffer_Release(&out);
    return result;
}

/* ---------------------------------------------------------------------------------------
 * WordPiece for plain ASCII words (wordpiece.py's AsciiWordPiece, compiled): learning a word
 * the cache has never seen (ids, numbers, hashes) spent ~6 us of its ~14 in the Python
 * longest-match-first search, a slice, a concatenation and a dict lookup per try. Here a try
 * hashes a few bytes. The vocabulary's ASCII entries go into one open-addressing table, word
 * starts and continuations (the `##` entries, prefix removed) told apart by a flag; entries
 * with other characters can never match a plain ASCII word and are left out.
 */
#define WORDPIECE_CAPSULE "router_worker.wordpiece"

typedef struct {
    int32_t offset;  /* into `chars`; -1 for an empty slot */
    int32_t id;
    int32_t length;
    int32_t tail;
} Slot;

typedef struct {
    Slot *slots;
    char *chars;
    Py_ssize_t mask;  /* slots - 1, a power of two minus one */
    int32_t unk;
    Py_ssize_t max_chars;  /* a piece longer than this is unknown (BERT's rule) */
    Py_ssize_t longest;  /* longest entry */
} WordPiece;

static uint64_t
wp_hash(const char *text, Py_ssize_t length, int tail)
{
    uint64_t h = tail ? 0x84222325cbf29ce4ULL : 0xcbf29ce484222325ULL;  /* FNV-1a */
    for (Py_ssize_t i = 0; i < length; i++) {
        h = (h ^ (unsigned char)text[i]) * 0x100000001b3ULL;
    }
    return h;
}

static int32_t
wp_find(const WordPiece *wp, const char *text, Py_ssize_t length, int tail)
{
    if (length > wp->longest) {
        return -1;
    }
    for (Py_ssize_t at = (Py_ssize_t)wp_hash(text, length, tail) & wp->mask;;
         at = (at + 1) & wp->mask) {
        const Slot *slot = &wp->slots[at];
        if (slot->offset < 0) {
            return -1;
        }
        if (slot->length == length && slot->tail == tail &&
            memcmp(wp->chars + slot->offset, text, (size_t)length) == 0) {
            return slot->id;
        }
    }
}

static void
wordpiece_free(PyObject *capsule)
{
    WordPiece *wp = PyCapsule_GetPointer(capsule, WORDPIECE_CAPSULE);
    if (wp != NULL) {
        PyMem_Free(wp->slots);
        PyMem_Free(wp->chars);
        PyMem_Free(wp);
    }
}

/* load_wordpiece(vocab: dict[str, int], prefix: str, unk: int, max_chars: int) -> capsule */
static PyObject *
load_wordpiece(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *vocab, *prefix;
    int unk;
    Py_ssize_t max_chars;
    if (!PyArg_ParseTuple(args, "O!Uin:load_wordpiece", &PyDict_Type, &vocab, &prefix, &unk,
                          &max_chars)) {
        return NULL;
    }
    Py_ssize_t prefix_length;
    const char *prefix_text = PyUnicode_AsUTF8AndSize(prefix, &prefix_length);
    if (prefix_text == NULL) {
        return NULL;
    }
    WordPiece *wp = PyMem_Calloc(1, sizeof(WordPiece));
    if (wp == NULL) {
        return PyErr_NoMemory();
    }
    wp->unk = unk;
    wp->max_chars = max_chars;
    Py_ssize_t slots = 16, chars = 0, used = 0, pos = 0;
    while (slots < 2 * PyDict_GET_SIZE(vocab)) {
        slots *= 2;
    }
    PyObject *key, *value;
    while (PyDict_Next(vocab, &pos, &key, &value)) {
        if (PyUnicode_Check(key) && PyUnicode_IS_ASCII(key)) {
            chars += PyUnicode_GET_LENGTH(key);
        }
    }
    wp->slots = PyMem_Malloc((size_t)slots * sizeof(Slot));
    wp->chars = PyMem_Malloc((size_t)(chars ? chars : 1));
    if (wp->slots == NULL || wp->chars == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < slots; i++) {
        wp->slots[i].offset = -1;
    }
    wp->mask = slots - 1;
    pos = 0;
    while (PyDict_Next(vocab, &pos, &key, &value)) {
        if (!PyUnicode_Check(key) || !PyUnicode_IS_ASCII(key)) {
            continue;
        }
        long id = PyLong_AsLong(value);
        if (id == -1 && PyErr_Occurred()) {
            goto fail;
        }
        const char *text = (const char *)PyUnicode_DATA(key);
        Py_ssize_t length = PyUnicode_GET_LENGTH(key);
        int tail = prefix_length > 0 && length > prefix_length &&
                   memcmp(text, prefix_text, (size_t)prefix_length) == 0;
        if (tail) {
            text += prefix_length;
            length -= prefix_length;
        }
        if (length == 0 || length > INT32_MAX || wp_find(wp, text, length, tail) >= 0) {
            continue;  /* a repeat */
        }
        Py_ssize_t at = (Py_ssize_t)wp_hash(text, length, tail) & wp->mask;
        while (wp->slots[at].offset >= 0) {
            at = (at + 1) & wp->mask;
        }
        memcpy(wp->chars + used, text, (size_t)length);
        wp->slots[at] = (Slot){(int32_t)used, (int32_t)id, (int32_t)length, tail};
        used += length;
        wp->longest = length > wp->longest ? length : wp->longest;
    }
    PyObject *capsule = PyCapsule_New(wp, WORDPIECE_CAPSULE, wordpiece_free);
    if (capsule != NULL) {
        return capsule;
    }
fail:
    PyMem_Free(wp->slots);
    PyMem_Free(wp->chars);
    PyMem_Free(wp);
    return NULL;
}

/* wordpiece.py's `handles`: printable ASCII without spaces or capitals */
static int
wp_handles(PyObject *word)
{
    if (!PyUnicode_IS_ASCII(word)) {
        return 0;
    }
    const unsigned char *text = PyUnicode_DATA(word);
    for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(word); i++) {
        if (text[i] <= ' ' || text[i] > '~' || (text[i] >= 'A' && text[i] <= 'Z')) {
            return 0;
        }
    }
    return 1;
}

static inline int
alnum(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

static int
append_id(PyObject *ids, long id)
{
    PyObject *value = PyLong_FromLong(id);
    if (value == NULL) {
        return -1;
    }
    int failed = PyList_Append(ids, value);
    Py_DECREF(value);
    return failed;
}

/* The ids of one piece (an alphanumeric run or one other character), appended to `ids`:
 * longest entry first at each position; where none fits, the whole piece is unknown. */
static int
wp_piece(const WordPiece *wp, const char *piece, Py_ssize_t size, PyObject *ids)
{
    Py_ssize_t mark = PyList_GET_SIZE(ids), start = 0;
    if (size > wp->max_chars) {  /* unknown even if it were an entry, as in BERT */
        return append_id(ids, wp->unk);
    }
    while (start < size) {
        Py_ssize_t length = size - start < wp->longest ? size - start : wp->longest;
        int32_t id = -1;
        while (length > 0 && (id = wp_find(wp, piece + start, length, start > 0)) < 0) {
            length--;
        }
        if (id < 0) {
            if (PyList_SetSlice(ids, mark, PyList_GET_SIZE(ids), NULL) < 0) {
                return -1;
            }
            return append_id(ids, wp->unk);
        }
        if (append_id(ids, id) < 0) {
            return -1;
        }
        start += length;
    }
    return 0;
}

/* wordpieces(wordpiece, words) -> [ids of each word, or None where `handles` refuses it] */
static PyObject *
wordpieces(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *capsule, *words;
    if (!PyArg_ParseTuple(args, "OO!:wordpieces", &capsule, &PyList_Type, &words)) {
        return NULL;
    }
    WordPiece *wp = PyCapsule_GetPointer(capsule, WORDPIECE_CAPSULE);
    if (wp == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(words);
    PyObject *result = PyList_New(n);
    if (result == NULL) {
        return NULL;
    }
    for (Py_ssize_t w = 0; w < n; w++) {
        PyObject *word = PyList_GET_ITEM(words, w);
        if (!PyUnicode_Check(word)) {
            PyErr_SetString(PyExc_TypeError, "words must be str");
            goto fail;
        }
        if (!wp_handles(word)) {
            PyList_SET_ITEM(result, w, Py_NewRef(Py_None));
            continue;
        }
        PyObject *ids = PyList_New(0);
        if (ids == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(result, w, ids);
        const char *text = (const char *)PyUnicode_DATA(word);
        Py_ssize_t length = PyUnicode_GET_LENGTH(word);
        for (Py_ssize_t i = 0; i < length;) {
            Py_ssize_t end = i + 1;
            if (alnum((unsigned char)text[i])) {
                while (end < length && alnum((unsigned char)text[end])) {
                    end++;
                }
            }
            if (wp_piece(wp, text + i, end - i, ids) < 0) {
                goto fail;
            }
            i = end;
        }
    }
    return result;
fail:
    Py_DECREF(result);
    return NULL;
}

static PyMethodDef methods[] = {
    {"load_head", load_head, METH_VARARGS,
     "load_head(arrays, params, sizes) -> head: FastHead's tables, checked and held."},
    {"logits", logits, METH_VARARGS,
     "logits(head, texts, lowered, words, cache, learn, out): a batch's logits into out."},
    {"load_wordpiece", load_wordpiece, METH_VARARGS,
     "load_wordpiece(vocab, prefix, unk, max_chars) -> wordpiece: the ASCII entries, hashed."},
    {"wordpieces", wordpieces, METH_VARARGS,
     "wordpieces(wordpiece, words) -> ids of each plain ASCII word, None for the others."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "router_worker.classify._cpu_head",
    "The CPU engine's serving head and ASCII WordPiece, compiled (cpu.FastHead and "
    "wordpiece.AsciiWordPiece hold the Python references).",
    0,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__cpu_head(void)
{
    return PyModule_Create(&module_def);
}
