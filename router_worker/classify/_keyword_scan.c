/*
 * The keyword tier's text scan, compiled: one call per prompt finds the configured phrases, the
 * complexity cues (cue words; code fences and list items), the words' near-misses known to the
 * fuzzy memo (and the words it does not know yet), and the prompt's word count.
 *
 * Why C: in Python each of those is a separate `re` scan (or str.split), each near the floor
 * of what `re` can do per character, and together they were ~25 us of the tier's ~31 us per
 * prompt. Here they are plain loops over the string's code points.
 *
 * The regexes in keyword.py stay the reference: every function below must give exactly what
 * they give (tests/unit/test_keyword_scan.py checks that on the corpus and on random text).
 * Character classes follow CPython's `re` for str patterns: \w is Py_UNICODE_ISALNUM or '_',
 * \d is Py_UNICODE_ISDECIMAL, \s (and str.split()) is Py_UNICODE_ISSPACE.
 *
 * A trie arrives flattened by keyword.py (`flatten_trie`) as two int32 buffers:
 *   nodes: 4 ints per node  (first edge, edge count, literal id or -1, tail flag)
 *   edges: 2 ints per edge  (code point, child node), each node's edges sorted by code point.
 * Node 0 is the root. A literal with the tail flag also takes the word characters after it
 * (the regex's `\w*`). Sizes and indexes are checked once when the trie is loaded, so the
 * scan itself never reads out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TRIE_CAPSULE "router_worker.keyword_trie"
#define MIN_WORD_LEN 5
/* keyword.py's _STRUCTURE_CHARS: how far structural cues are looked for */
#define STRUCTURE_CHARS 4000

typedef struct {
    int32_t first;
    int32_t count;
    int32_t id;
    int32_t tail;
} Node;

typedef struct {
    int32_t ch;
    int32_t child;
} Edge;

typedef struct {
    Node *nodes;
    Edge *edges;
    Py_ssize_t n_nodes;
    Py_ssize_t n_edges;
    /* The root's children by ASCII character (0: none). Every word boundary starts at the
     * root, so this lookup runs ~once per word; a binary search there mispredicted often
     * enough to be most of the scan's time. */
    int32_t root_ascii[128];
} Trie;

/* Each character of the scanned text is classified once into these flags, so the passes below
 * test a byte: the Unicode tests behind \w are function calls, and CJK text is all non-ASCII. */
enum { WORD = 1, LETTER = 2 };

/* ASCII answers from a table: almost every prompt character is ASCII. */
static unsigned char ascii_flags[128];

static inline unsigned char
flags_of(Py_UCS4 ch)
{
    if (ch < 128) {
        return ascii_flags[ch];
    }
    if (!Py_UNICODE_ISALNUM(ch)) {
        return 0;
    }
    /* [^\W\d_]: a word character that is neither a decimal digit nor '_' */
    return Py_UNICODE_ISDECIMAL(ch) ? WORD : (WORD | LETTER);
}

static void
classify_chars(int kind, const void *data, Py_ssize_t n, unsigned char *flags)
{
    if (kind == PyUnicode_1BYTE_KIND) {  /* ASCII and Latin-1: most prompts */
        const Py_UCS1 *chars = (const Py_UCS1 *)data;
        for (Py_ssize_t i = 0; i < n; i++) {
            flags[i] = chars[i] < 128 ? ascii_flags[chars[i]] : flags_of(chars[i]);
        }
        return;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        flags[i] = flags_of(PyUnicode_READ(kind, data, i));
    }
}

static void
trie_free(PyObject *capsule)
{
    Trie *trie = (Trie *)PyCapsule_GetPointer(capsule, TRIE_CAPSULE);
    if (trie != NULL) {
        PyMem_Free(trie->nodes);
        PyMem_Free(trie->edges);
        PyMem_Free(trie);
    }
}

static int
trie_check(const Trie *trie)
{
    if (trie->n_nodes < 1) {
        PyErr_SetString(PyExc_ValueError, "a trie needs its root node");
        return -1;
    }
    for (Py_ssize_t i = 0; i < trie->n_nodes; i++) {
        const Node *node = &trie->nodes[i];
        if (node->first < 0 || node->count < 0
            || (Py_ssize_t)node->first + node->count > trie->n_edges) {
            PyErr_Format(PyExc_ValueError, "node %zd points outside the edge table", i);
            return -1;
        }
        for (int32_t e = node->first; e < node->first + node->count; e++) {
            const Edge *edge = &trie->edges[e];
            if (edge->child <= 0 || edge->child >= trie->n_nodes) {
                PyErr_Format(PyExc_ValueError, "edge %d points outside the node table", e);
                return -1;
            }
            if (e > node->first && trie->edges[e - 1].ch >= edge->ch) {
                PyErr_Format(PyExc_ValueError, "node %zd's edges are not sorted", i);
                return -1;
            }
        }
    }
    return 0;
}

/* load_trie(nodes: bytes, edges: bytes) -> capsule */
static PyObject *
load_trie(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer nodes, edges;
    if (!PyArg_ParseTuple(args, "y*y*:load_trie", &nodes, &edges)) {
        return NULL;
    }
    PyObject *result = NULL;
    Trie *trie = PyMem_Calloc(1, sizeof(Trie));
    if (trie == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (nodes.len % sizeof(Node) != 0 || edges.len % sizeof(Edge) != 0) {
        PyErr_SetString(PyExc_ValueError, "trie buffers must hold whole int32 records");
        goto fail;
    }
    trie->n_nodes = nodes.len / (Py_ssize_t)sizeof(Node);
    trie->n_edges = edges.len / (Py_ssize_t)sizeof(Edge);
    trie->nodes = PyMem_Malloc(nodes.len ? (size_t)nodes.len : 1);
    trie->edges = PyMem_Malloc(edges.len ? (size_t)edges.len : 1);
    if (trie->nodes == NULL || trie->edges == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    memcpy(trie->nodes, nodes.buf, (size_t)nodes.len);
    memcpy(trie->edges, edges.buf, (size_t)edges.len);
    if (trie_check(trie) < 0) {
        goto fail;
    }
    for (int32_t e = trie->nodes[0].first; e < trie->nodes[0].first + trie->nodes[0].count; e++) {
        if (trie->edges[e].ch >= 0 && trie->edges[e].ch < 128) {
            trie->root_ascii[trie->edges[e].ch] = trie->edges[e].child;
        }
    }
    result = PyCapsule_New(trie, TRIE_CAPSULE, trie_free);
    if (result != NULL) {
        goto done;
    }
fail:
    if (trie != NULL) {
        PyMem_Free(trie->nodes);
        PyMem_Free(trie->edges);
        PyMem_Free(trie);
    }
done:
    PyBuffer_Release(&nodes);
    PyBuffer_Release(&edges);
    return result;
}

static inline int32_t
child_of(const Trie *trie, const Node *node, Py_UCS4 ch)
{
    if (node == trie->nodes && ch < 128) {
        return trie->root_ascii[ch] ? trie->root_ascii[ch] : -1;
    }
    int32_t lo = node->first, hi = node->first + node->count;
    if (node->count <= 8) {  /* below the root most nodes have one child: scan them */
        for (; lo < hi; lo++) {
            if ((Py_UCS4)trie->edges[lo].ch == ch) {
                return trie->edges[lo].child;
            }
        }
        return -1;
    }
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        Py_UCS4 key = (Py_UCS4)trie->edges[mid].ch;
        if (key == ch) {
            return trie->edges[mid].child;
        }
        if (key < ch) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return -1;
}

/* The end of the longest literal starting at `start` that is followed by a non-word character
 * (or the end), or -1; its id goes to *id. The regex reaches the same answer by backtracking:
 * its trie alternation tries longer continuations first. */
static Py_ssize_t
longest_at(const Trie *trie, int kind, const void *data, const unsigned char *flags,
           Py_ssize_t n, Py_ssize_t start, int32_t *id)
{
    const Node *node = &trie->nodes[0];
    Py_ssize_t i = start, best = -1;
    for (;;) {
        if (node->id >= 0) {
            Py_ssize_t end = i;
            if (node->tail) {
                while (end < n && (flags[end] & WORD)) {
                    end++;
                }
                best = end;
                *id = node->id;
            }
            else if (end == n || !(flags[end] & WORD)) {
                best = end;
                *id = node->id;
            }
        }
        if (i >= n || node->count == 0) {
            return best;
        }
        int32_t child = child_of(trie, node, PyUnicode_READ(kind, data, i));
        if (child < 0) {
            return best;
        }
        node = &trie->nodes[child];
        i++;
    }
}

/* Non-overlapping matches left to right, each starting after a non-word character (or at the
 * start), like re.findall with (?<!\w) before the alternation and (?!\w) after it. Appends the
 * ids to `ids` when it is not NULL; returns the number of matches, or -1 on error. */
static Py_ssize_t
find_literals(const Trie *trie, int kind, const void *data, const unsigned char *flags,
              Py_ssize_t n, PyObject *ids)
{
    Py_ssize_t found = 0, p = 0;
    while (p < n) {
        if (p > 0 && (flags[p - 1] & WORD)) {
            p++;
            continue;
        }
        int32_t id = -1;
        Py_ssize_t end = longest_at(trie, kind, data, flags, n, p, &id);
        if (end <= p) {  /* no match (a literal is never empty, but never loop on one) */
            p++;
            continue;
        }
        found++;
        if (ids != NULL) {
            PyObject *value = PyLong_FromLong(id);
            if (value == NULL || PyList_Append(ids, value) < 0) {
                Py_XDECREF(value);
                return -1;
            }
            Py_DECREF(value);
        }
        p = end;
    }
    return found;
}

/* Maximal runs of letters at least MIN_WORD_LEN long, like re.findall(r"[^\W\d_]{5,}"), each
 * looked up in `memo` (word -> the phrase word it is a near-miss of, or None): a near-miss adds
 * its phrase word to `near`, a word not in the memo yet goes to `fresh`, and a word known to
 * be no near-miss (almost all of them, once the memo is warm) costs nothing more. */
static int
find_words(PyObject *text, const unsigned char *flags, Py_ssize_t n, PyObject *memo,
           PyObject *near, PyObject *fresh)
{
    Py_ssize_t run = 0;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i < n && (flags[i] & LETTER)) {
            run++;
            continue;
        }
        if (run >= MIN_WORD_LEN) {
            PyObject *word = PyUnicode_Substring(text, i - run, i);
            if (word == NULL) {
                return -1;
            }
            PyObject *phrase = PyDict_GetItemWithError(memo, word);  /* borrowed */
            int failed;
            if (phrase == NULL) {
                failed = PyErr_Occurred() != NULL || PyList_Append(fresh, word) < 0;
            }
            else {
                failed = phrase != Py_None && PyList_Append(near, phrase) < 0;
            }
            Py_DECREF(word);
            if (failed) {
                return -1;
            }
        }
        run = 0;
    }
    return 0;
}

/* len(_STRUCTURE.findall(text[:STRUCTURE_CHARS])) for the regex
 *     ```|^\s*(?:\d+[.)]|[-*])\s      (re.MULTILINE)
 * Left to right, non-overlapping: a fence first, else at a line start (position 0 or after
 * '\n') whitespace, then digits and '.' or ')', or '-' or '*', then one whitespace. Neither
 * branch can backtrack into a different match (the character after greedy whitespace or digits
 * decides), so one forward pass gives the regex's matches. */
static Py_ssize_t
count_structure(PyObject *text)
{
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), count = 0, p = 0;
    if (n > STRUCTURE_CHARS) {
        n = STRUCTURE_CHARS;
    }
    while (p < n) {
        if (p + 2 < n && PyUnicode_READ(kind, data, p) == '`'
            && PyUnicode_READ(kind, data, p + 1) == '`' && PyUnicode_READ(kind, data, p + 2) == '`') {
            count++;
            p += 3;
            continue;
        }
        if (p == 0 || PyUnicode_READ(kind, data, p - 1) == '\n') {
            Py_ssize_t q = p;
            while (q < n && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, q))) {
                q++;
            }
            int marker = 0;
            if (q < n && Py_UNICODE_ISDECIMAL(PyUnicode_READ(kind, data, q))) {
                while (q < n && Py_UNICODE_ISDECIMAL(PyUnicode_READ(kind, data, q))) {
                    q++;
                }
                if (q < n) {
                    Py_UCS4 ch = PyUnicode_READ(kind, data, q);
                    marker = ch == '.' || ch == ')';
                }
            }
            else if (q < n) {
                Py_UCS4 ch = PyUnicode_READ(kind, data, q);
                marker = ch == '-' || ch == '*';
            }
            if (marker && q + 1 < n && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, q + 1))) {
                count++;
                p = q + 2;
                continue;
            }
        }
        p++;
    }
    return count;
}

/* len(text.split()) without building the pieces. */
static Py_ssize_t
count_split(PyObject *text)
{
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), count = 0;
    int inside = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, i))) {
            inside = 0;
        }
        else if (!inside) {
            inside = 1;
            count++;
        }
    }
    return count;
}

static Trie *
trie_from(PyObject *capsule)
{
    return (Trie *)PyCapsule_GetPointer(capsule, TRIE_CAPSULE);
}

/* scan(phrases, cues, memo, text, lowered)
 *     -> (phrase ids, near-miss phrase words, fresh words, cue count, word count, structure)
 *
 * `lowered` is the clipped, lower-cased text every match runs on; the word count is of the
 * whole `text`, as estimate_complexity counts it, and the structural cues of its head. With
 * `memo` None the words are not looked at (an engine without phrase words to be near). */
static PyObject *
scan(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *phrases_capsule, *cues_capsule, *memo, *text, *lowered;
    if (!PyArg_ParseTuple(args, "OOOUU:scan", &phrases_capsule, &cues_capsule, &memo, &text,
                          &lowered)) {
        return NULL;
    }
    if (memo != Py_None && !PyDict_Check(memo)) {
        PyErr_SetString(PyExc_TypeError, "memo must be a dict or None");
        return NULL;
    }
    Trie *phrases = trie_from(phrases_capsule);
    Trie *cues = phrases ? trie_from(cues_capsule) : NULL;
    if (cues == NULL) {
        return NULL;
    }
    int kind = PyUnicode_KIND(lowered);
    const void *data = PyUnicode_DATA(lowered);
    Py_ssize_t n = PyUnicode_GET_LENGTH(lowered);
    unsigned char small[2048];
    unsigned char *flags = n <= (Py_ssize_t)sizeof(small) ? small : PyMem_Malloc((size_t)n);
    if (flags == NULL) {
        return PyErr_NoMemory();
    }
    classify_chars(kind, data, n, flags);

    PyObject *result = NULL;
    PyObject *ids = PyList_New(0);
    PyObject *near = PyList_New(0);
    PyObject *fresh = PyList_New(0);
    Py_ssize_t cue_count;
    if (ids == NULL || near == NULL || fresh == NULL
        || find_literals(phrases, kind, data, flags, n, ids) < 0
        || (cue_count = find_literals(cues, kind, data, flags, n, NULL)) < 0
        || (memo != Py_None && find_words(lowered, flags, n, memo, near, fresh) < 0)) {
        Py_XDECREF(ids);
        Py_XDECREF(near);
        Py_XDECREF(fresh);
    }
    else {
        result = Py_BuildValue("(NNNnnn)", ids, near, fresh, cue_count, count_split(text),
                               count_structure(text));
    }
    if (flags != small) {
        PyMem_Free(flags);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"load_trie", load_trie, METH_VARARGS,
     "load_trie(nodes, edges) -> trie: a flattened trie (see keyword.flatten_trie), checked."},
    {"scan", scan, METH_VARARGS,
     "scan(phrases, cues, memo, text, lowered) -> (phrase ids, near-miss phrase words, "
     "fresh words, cue count, word count)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "router_worker.classify._keyword_scan",
    "The keyword tier's text scan, compiled (keyword.py holds the reference regexes).",
    0,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__keyword_scan(void)
{
    for (int ch = 0; ch < 128; ch++) {
        int letter = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
        int word = letter || (ch >= '0' && ch <= '9') || ch == '_';
        ascii_flags[ch] = (unsigned char)((word ? WORD : 0) | (letter ? LETTER : 0));
    }
    return PyModule_Create(&module_def);
}
