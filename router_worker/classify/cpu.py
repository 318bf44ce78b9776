"""CPU engine: distilled static MiniLM embeddings + token n-grams + linear heads (numpy, and a
compiled serving head, _cpu_head.c, where the install built it)."""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import structlog
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from router_worker.classify.artifacts import Artifact, load_artifact, read_extra
from router_worker.classify.engine import Prediction
from router_worker.classify.lexicon import (
    LEXICON,
    MAX_PHRASE_WORDS,
    PHRASE_MULT,
    Lexicon,
    strip_word,
)
from router_worker.classify.wordpiece import AsciiWordPiece
from router_worker.errors import ArtifactError
from router_worker.events import Tier

try:  # built from _cpu_head.c where the install found a C compiler (see setup.py)
    from router_worker.classify import _cpu_head as _native
except ImportError:  # pragma: no cover - exercised only on installs without a compiler
    _native = None  # type: ignore[assignment]

log = structlog.get_logger(__name__)

ENGINE_NAME = "cpu"
ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_HEAD_FILE = "encoder_head.npz"
# The words the head was fit on, learned when a worker loads the artifact. Without them every
# word is learned on its first sighting (~8.5 us: WordPiece, lexicon and prefix columns): after
# a start, the first pass over a vocabulary of tens of thousands of words raised the p99 at
# 1,000 req/s by 5-10 ms (benchmarks/README.md, 2026-11-26). Words with digits are left out,
# as the cache leaves them out until their second sighting; the most frequent first.
VOCABULARY_FILE = "vocabulary.npz"
VOCABULARY_MAX = 60_000
# Bigram hashing space; collisions at this size are rare for a corpus of thousands of prompts.
BIGRAM_BUCKETS = 1 << 18
# Prompts are capped (64 KiB by default) but a few thousand tokens say all a label needs.
MAX_TOKENS = 512
_MAX_CHARS = MAX_TOKENS * 8
CHUNK = 128
# Word -> WordPiece ids; the Rust tokenizer costs microseconds a word, a dict hit nanoseconds.
WORD_CACHE = 200_000
# A word with a digit is cached on its second sighting: ids, hashes and numbers that never
# recur would otherwise fill the cache (and the worker's memory) with entries nobody reads
# again. The hashes of such words seen once are kept up to this many, then forgotten all at
# once. Words without digits (a language's vocabulary, which recurs) are cached at once.
SEEN_ONCE = 100_000
_HAS_DIGIT = re.compile(r"\d").search
_BIGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)
# Bucket = the top 18 bits of (hash * _BIGRAM_MULT): both hashed blocks have 1 << 18 buckets.
_HASH_SHIFT = np.uint64(46)
# Character n-grams carry what word pieces miss: typos, code symbols, CJK and Cyrillic text.
CHAR_BUCKETS = 1 << 18
CHAR_NGRAMS = (2, 3, 4)
# Intent is stated early; a bounded prefix keeps the n-gram cost flat for long prompts.
CHAR_LIMIT = 512
# Max pooling runs over the top principal directions of the embedding table: a 64-wide row
# gathers and reduces four times faster than the full 256, and keeps what max adds.
MAX_DIMS = 64
_CHAR_PRIME = np.uint64(1_000_003)
# Word prefixes: a word's first letters carry its stem across inflections (escribe, escribir;
# перевод, переведи) that word pieces from an English vocabulary split into unrelated pieces.
# Chosen on validation: 5 letters beat 4 and 6; +0.013 macro-F1 over no word features. The
# lexicon's concept columns (lexicon.py) follow the prefix buckets: +0.03 more on validation.
WORD_BUCKETS = 1 << 18
PREFIX_CHARS = 5
MIN_WORD_CHARS = 3

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def prompt_words(text: str) -> list[str]:
    """The words of a prompt as the word cache keys them (`StaticEncoder.tokens`)."""
    return text[:_MAX_CHARS].lower().split()


def cached_at_first_sight(word: str) -> bool:
    """Words without digits recur (a language's vocabulary); ids and numbers mostly do not."""
    return _HAS_DIGIT(word) is None


def configure_threads(threads: int) -> None:
    """Bound the engine's native thread pools (tokenizers' rayon, BLAS) to `threads`.

    Rayon reads its variable when its pool starts, so this runs before the first encode;
    BLAS pools are already up once numpy is imported, so threadpoolctl limits them if present.
    """
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    try:
        from threadpoolctl import threadpool_limits  # optional, ml extra only
    except ImportError:
        return
    threadpool_limits(limits=threads)


def segment_sum(values: F32, owner: I64, n: int) -> F32:
    """Row sums of `values` grouped by `owner` (sorted, in 0..n-1); empty groups are zero."""
    counts = np.bincount(owner, minlength=n)
    starts = np.cumsum(counts) - counts
    # A trailing zero row keeps every start index valid, including those of empty groups at the end.
    padded = np.vstack([values, np.zeros((1, values.shape[1]), dtype=values.dtype)])
    sums = np.add.reduceat(padded, starts, axis=0)
    sums[counts == 0] = 0.0
    return sums


def _inv_sqrt(counts: F32) -> F32:
    return (1.0 / np.sqrt(np.maximum(counts, 1.0))).astype(np.float32)


def char_ngrams(texts: Sequence[str], offset: int) -> list[tuple[I64, I64, F32]]:
    """Hashed lower-cased character n-grams of every text, as bag parts, without a text loop.

    All texts are joined with NUL and hashed as one code-point array; windows that cross a
    NUL are dropped, and the count of NULs before a window names its text.
    """
    n = len(texts)
    joined = "\0".join(t[:CHAR_LIMIT] for t in texts)
    if joined.count("\0") != n - 1:  # a text held NULs itself: blank them so owners stay right
        joined = "\0".join(t[:CHAR_LIMIT].replace("\0", " ") for t in texts)
    codes = np.frombuffer(joined.lower().encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    sep = codes == 0
    before = np.cumsum(sep)
    parts: list[tuple[I64, I64]] = []
    for size in CHAR_NGRAMS:
        m = codes.shape[0] - size + 1
        if m <= 0:
            continue
        h = codes[:m].copy()
        for k in range(1, size):
            h = h * _CHAR_PRIME + codes[k : k + m]
        valid = (before[size - 1 : size - 1 + m] == before[:m]) & ~sep[:m]
        buckets = ((h[valid] * _BIGRAM_MULT) >> _HASH_SHIFT).astype(np.int64) % CHAR_BUCKETS
        parts.append((buckets + offset, before[:m][valid].astype(np.int64)))
    total = np.zeros(n, dtype=np.float32)
    for _, owner in parts:
        total += np.bincount(owner, minlength=n).astype(np.float32)
    scale = _inv_sqrt(total)
    return [(idx, owner, scale) for idx, owner in parts]


def hash_dir(path: Path) -> str:
    """sha256 of a static model's weights and tokenizer: ties an artifact to its encoder."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json"):
        try:
            digest.update((path / name).read_bytes())
        except OSError as exc:
            raise ArtifactError(f"static model at {path} lacks {name}: {exc}") from exc
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Tokens:
    """A batch's word pieces and word-level columns, each with the text that owns it."""

    ids: I64
    owner: I64
    word_cols: I64
    word_owner: I64
    phrase_concepts: I64
    phrase_owner: I64

    @classmethod
    def empty(cls) -> Tokens:
        """No words in the whole batch."""
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, none, none, none, none)


@dataclass(frozen=True, slots=True)
class Features:
    """A batch's features: a dense block plus sparse bag parts (column, owning text, scale)."""

    dense: F32
    bag: tuple[tuple[I64, I64, F32], ...]
    bag_width: int

    @property
    def n(self) -> int:
        """Number of texts."""
        return int(self.dense.shape[0])


class StaticEncoder:
    """Tokenizer + static embedding table distilled from MiniLM (built by `build-encoder`)."""

    def __init__(self, model_dir: Path) -> None:
        try:
            self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            table = load_file(str(model_dir / "model.safetensors"))["embeddings"]
        except Exception as exc:  # tokenizers raises bare Exception on a bad file
            raise ArtifactError(
                f"cannot load static model from {model_dir}: {exc}; "
                "run `router-worker build-encoder` (make model)"
            ) from exc
        self.tokenizer.no_padding()
        # Truncation is per text, applied after the batch's words are stitched back together.
        self.tokenizer.no_truncation()
        self.embeddings: F32 = np.ascontiguousarray(table, dtype=np.float32)
        self.vocab_size = int(self.embeddings.shape[0])
        self.dim = int(self.embeddings.shape[1])
        unk = self.tokenizer.token_to_id("[UNK]")
        self.unk_id = -1 if unk is None else int(unk)
        self.model_dir = model_dir
        self.wordpiece = AsciiWordPiece.from_tokenizer_json(model_dir / "tokenizer.json")
        self.lexicon: Lexicon = LEXICON
        # Word -> what it contributes (see `tokens`), bounded by WORD_CACHE; hashes of words
        # seen once (not cached yet), bounded by SEEN_ONCE.
        self._words: dict[str, tuple[int, ...]] = {}
        self._seen_once: set[int] = set()
        self.projection = principal_directions(self.embeddings, min(MAX_DIMS, self.dim))
        self.projected: F32 = np.ascontiguousarray(self.embeddings @ self.projection)
        self.max_dim = int(self.projection.shape[1])

    @property
    def word_offset(self) -> int:
        """First bag column of the word-level block (prefix buckets, then concepts)."""
        return self.vocab_size + BIGRAM_BUCKETS + CHAR_BUCKETS

    def bag_size(self) -> int:
        """Bag columns: vocabulary tokens, token-bigram and char-n-gram buckets, word prefix
        buckets, lexicon concepts."""
        return self.word_offset + WORD_BUCKETS + self.lexicon.size

    def tokens(self, texts: Sequence[str]) -> Tokens:
        """Word pieces and word-level columns of a batch, flat with their owning texts.

        WordPiece works word by word, so everything a word contributes comes from one cache
        entry (one C-level dict lookup per word); only words never seen go to the tokenizer,
        all in one call. An entry packs three kinds of ints, told apart by range: word pieces
        (0..vocab-1), word-level columns (vocab + column in the word block) and the word's
        phrase-word id (negative). One flattening then serves all three, without a text loop.
        """
        n = len(texts)
        per_text = [prompt_words(t) for t in texts]
        words = list(chain.from_iterable(per_text))
        if not words:
            return Tokens.empty()
        flat, flat_word = _flatten(self.entries(words))
        n_words = np.fromiter(map(len, per_text), dtype=np.int64, count=n)
        word_owner = np.repeat(np.arange(n, dtype=np.int64), n_words)
        vocab = self.vocab_size
        piece = (flat >= 0) & (flat < vocab)
        ids, owner = flat[piece], word_owner[flat_word[piece]]
        per = np.bincount(owner, minlength=n)
        position = np.arange(ids.shape[0]) - np.repeat(np.cumsum(per) - per, per)
        keep = (ids != self.unk_id) & (position < MAX_TOKENS)
        column = flat >= vocab
        phrase_word = flat < 0
        word_ids = np.zeros(len(words), dtype=np.int64)
        word_ids[flat_word[phrase_word]] = -flat[phrase_word]
        phrases, phrase_owner = self.lexicon.phrase_columns(word_ids, word_owner)
        return Tokens(
            ids[keep],
            owner[keep],
            flat[column] - vocab + self.word_offset,
            word_owner[flat_word[column]],
            phrases,
            phrase_owner,
        )

    def entries(self, words: list[str]) -> list[tuple[int, ...]]:
        """The cache entry of each word (see `tokens`), learning the words never seen."""
        entries = list(map(self._words.get, words))
        if None in entries:
            pairs = list(zip(words, entries, strict=True))
            fresh = self.learn_missing([w for w, e in pairs if e is None])
            entries = [fresh[w] if e is None else e for w, e in pairs]
        return cast(list[tuple[int, ...]], entries)

    @property
    def word_cache(self) -> dict[str, tuple[int, ...]]:
        """Word -> entry (see `tokens`); the compiled head reads it, only `_learn_words` writes."""
        return self._words

    def learn_missing(self, missing: list[str]) -> dict[str, tuple[int, ...]]:
        """Entries of words the cache lacks (repeats allowed), each learned once: what `entries`
        and the compiled head call on a cache miss."""
        return self._learn_words(dict.fromkeys(missing))

    def adopt_words(self, previous: StaticEncoder) -> None:
        """Share `previous`'s word cache: entries depend only on the tokenizer, the lexicon and
        this module, so an encoder of the same static model may use them as they are. Callers
        check the static model is the same (its hash); the lexicon is this process's."""
        self._words = previous._words
        self._seen_once = previous._seen_once

    def prelearn(self, words: Iterable[str], chunk: int = 4096) -> int:
        """Cache the entries of `words` ahead of traffic; returns how many were new.

        Stops where the cache would be full, so it never clears what it learned.
        """
        fresh = [w for w in dict.fromkeys(words) if w and w not in self._words]
        fresh = fresh[: max(WORD_CACHE - len(self._words), 0)]
        for start in range(0, len(fresh), chunk):
            self._learn_words(fresh[start : start + chunk])
        return len(fresh)

    def _learn_words(self, missing: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """Entries of words not in the cache (one tokenizer call). Words without digits are
        cached from now on; words with digits from their second sighting (the first is only
        remembered by hash)."""
        missing = list(missing)
        cache, seen = self._words, self._seen_once
        grouped = self._word_pieces(missing)
        if len(cache) + len(missing) > WORD_CACHE:
            cache.clear()
        if len(seen) + len(missing) > SEEN_ONCE:
            seen.clear()
        fresh: dict[str, tuple[int, ...]] = {}
        for word, pieces in zip(missing, grouped, strict=True):
            core = strip_word(word)
            pieces.extend(self.vocab_size + c for c in self.word_columns(core))
            phrase_id = self.lexicon.word_id(core)
            if phrase_id:
                pieces.append(-phrase_id)
            entry = fresh[word] = tuple(pieces)
            if cached_at_first_sight(word) or hash(word) in seen:
                cache[word] = entry
            else:
                seen.add(hash(word))
        return fresh

    def _word_pieces(self, words: list[str]) -> list[list[int]]:
        """WordPiece ids of each word: plain ASCII by `AsciiWordPiece`, the rest in one
        tokenizer call."""
        fast = self.wordpiece
        found = fast.tokenize_many(words) if fast is not None else [None] * len(words)
        slow = [i for i, ids in enumerate(found) if ids is None]  # left to the tokenizer
        grouped = [[] if ids is None else ids for ids in found]
        if slow:
            encoding = self.tokenizer.encode(
                [words[i] for i in slow], is_pretokenized=True, add_special_tokens=False
            )
            for piece, word in zip(encoding.ids, encoding.word_ids, strict=True):
                if word is not None:
                    grouped[slow[word]].append(piece)
        return grouped

    def word_columns(self, core: str) -> tuple[int, ...]:
        """Columns in the word block of one stripped word: lexicon concepts, prefix bucket."""
        cols = [WORD_BUCKETS + c for c in self.lexicon.concepts(core)]
        if len(core) >= MIN_WORD_CHARS:
            prefix = core[:PREFIX_CHARS].encode("utf-8", "surrogatepass")
            cols.append(zlib.crc32(prefix) % WORD_BUCKETS)
        return tuple(cols)

    def dense_width(self) -> int:
        """Dense features: mean pooled embeddings, max over their projection, three length stats."""
        return self.dim + self.max_dim + 3

    def features(self, texts: Sequence[str]) -> Features:
        """Mean-pooled embeddings, max-pooled projections, length stats and the n-gram bag.

        Training reads these; serving folds the dense head into per-token rows instead
        (`FastHead`), which is why the mean is a plain average: it stays linear in the tokens.
        """
        n = len(texts)
        tokens = self.tokens(texts)
        ids = tokens.ids
        counts_i = np.bincount(tokens.owner, minlength=n)
        mean = pool(self.embeddings[ids], counts_i) * _inv_count(counts_i)[:, None]
        peak = pool(self.projected[ids], counts_i, np.maximum)
        dense = np.hstack([mean, peak, self.stats(texts, counts_i)]).astype(np.float32)
        bag = self.bag(texts, tokens, counts_i)
        return Features(dense=dense, bag=bag, bag_width=self.bag_size())

    def stats(self, texts: Sequence[str], counts: I64) -> F32:
        """log1p of token, character and line counts."""
        n = len(texts)
        chars = np.fromiter(map(len, texts), dtype=np.float32, count=n)
        lines = np.fromiter((t.count("\n") for t in texts), dtype=np.float32, count=n)
        return np.log1p(np.stack([counts.astype(np.float32), chars, lines], axis=1))

    def bag(
        self, texts: Sequence[str], tokens: Tokens, counts: I64
    ) -> tuple[tuple[I64, I64, F32], ...]:
        """Bag parts: token unigrams, hashed token bigrams, hashed char n-grams, word columns."""
        n = len(texts)
        ids, owner = tokens.ids, tokens.owner
        same = owner[1:] == owner[:-1]
        pair = ids[:-1][same].astype(np.uint64) * np.uint64(self.vocab_size) + ids[1:][same].astype(
            np.uint64
        )
        buckets = ((pair * _BIGRAM_MULT) >> _HASH_SHIFT).astype(np.int64) % BIGRAM_BUCKETS
        bigram_owner = owner[:-1][same]
        n_feats = counts.astype(np.float32) + np.bincount(bigram_owner, minlength=n).astype(
            np.float32
        )
        scale = _inv_sqrt(n_feats)
        char_parts = char_ngrams(texts, self.vocab_size + BIGRAM_BUCKETS)
        word_scale = _inv_sqrt(np.bincount(tokens.word_owner, minlength=n).astype(np.float32))
        return (
            (ids, owner, scale),
            (buckets + self.vocab_size, bigram_owner, scale),
            *char_parts,
            (tokens.word_cols, tokens.word_owner, word_scale),
            (
                tokens.phrase_concepts + self.word_offset + WORD_BUCKETS,
                tokens.phrase_owner,
                word_scale,
            ),
        )


def add_parts(out: F32, gathered: F32, parts: Sequence[tuple[I64, I64, F32]]) -> None:
    """Add each part's rows of `gathered` (the parts' rows one after another, each part's
    sorted by owner) to `out[owner]`, scaled by the part's per-text scale.

    One segment sum over every part at once: a part-by-part loop cost ~7 numpy calls a part,
    most of a small batch's time. Each (part, owner) run is summed in row order and added in
    part order, the same float operations as the loop, so the result is bitwise the same.
    """
    owners = np.concatenate([owner for _, owner, _ in parts])
    total = owners.shape[0]
    if not total:
        return
    n = out.shape[0]
    part_start = np.cumsum([0, *(owner.shape[0] for _, owner, _ in parts[:-1])])
    new_run = np.empty(total, dtype=bool)
    new_run[0] = True
    np.not_equal(owners[1:], owners[:-1], out=new_run[1:])
    new_run[part_start[part_start < total]] = True  # a part's first run, even if same owner
    starts = np.flatnonzero(new_run)
    run_owner = owners[starts]
    # The part of each run (the last part starting at or before it: empty parts start where
    # the next one does) and that part's scale for the run's text.
    run_part = np.searchsorted(part_start, starts, side="right") - 1
    scales = np.concatenate([scale for _, _, scale in parts])
    weighted = np.add.reduceat(gathered, starts, axis=0) * scales[run_part * n + run_owner, None]
    np.add.at(out, run_owner, weighted)  # in run order: part by part for each text


def _flatten(groups: Sequence[tuple[int, ...]]) -> tuple[I64, I64]:
    """Concatenated tuples and, for each element, the index of the tuple it came from."""
    width = np.fromiter(map(len, groups), dtype=np.int64, count=len(groups))
    flat = np.fromiter(chain.from_iterable(groups), dtype=np.int64, count=int(width.sum()))
    return flat, np.repeat(np.arange(len(groups), dtype=np.int64), width)


def _inv_count(counts: I64) -> F32:
    return (1.0 / np.maximum(counts, 1)).astype(np.float32)


def principal_directions(table: F32, k: int) -> F32:
    """Top-k eigenvectors of the table's second-moment matrix, signs fixed: deterministic."""
    gram = table.astype(np.float64).T @ table.astype(np.float64)
    _, vectors = np.linalg.eigh(gram)
    top = vectors[:, ::-1][:, :k]
    signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(k)])
    return (top * np.where(signs == 0, 1.0, signs)).astype(np.float32)


def pool(rows: F32, counts: I64, op: np.ufunc = np.add) -> F32:
    """Per-text `op` (add or maximum) of consecutive `rows` (`counts[i]` for text i); empty: 0.

    Reduced along the last axis of the transposed rows: numpy's reduceat is several times
    faster over contiguous runs than down the columns of a row-major block.
    """
    n, width = counts.shape[0], rows.shape[1]
    out = np.zeros((width, n), np.float32)
    present = counts > 0
    if present.any():
        starts = (np.cumsum(counts) - counts)[present]
        out[:, present] = op.reduceat(np.ascontiguousarray(rows.T), starts, axis=1)
    return out.T


@dataclass(frozen=True, slots=True)
class LinearHead:
    """Both heads fused: standardise dense features, then one gather-sum over the bag."""

    mean: F32
    std: F32
    w_dense: F32
    w_bag: F32 | None
    bias: F32
    n_categories: int

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], prefix: str, n_categories: int) -> LinearHead:
        """Rebuild from `<prefix>mean|std|w_dense|w_bag|bias` arrays of an artifact."""
        try:
            w_bag = arrays.get(f"{prefix}w_bag")
            return cls(
                mean=arrays[f"{prefix}mean"].astype(np.float32),
                std=arrays[f"{prefix}std"].astype(np.float32),
                w_dense=arrays[f"{prefix}w_dense"].astype(np.float32),
                w_bag=None if w_bag is None else w_bag.astype(np.float32),
                bias=arrays[f"{prefix}bias"].astype(np.float32),
                n_categories=n_categories,
            )
        except KeyError as exc:
            raise ArtifactError(f"artifact head lacks array {exc}") from exc

    def to_arrays(self, prefix: str) -> dict[str, npt.NDArray[Any]]:
        """Arrays for head.npz."""
        arrays: dict[str, npt.NDArray[Any]] = {
            f"{prefix}mean": self.mean,
            f"{prefix}std": self.std,
            f"{prefix}w_dense": self.w_dense,
            f"{prefix}bias": self.bias,
        }
        if self.w_bag is not None:
            arrays[f"{prefix}w_bag"] = self.w_bag
        return arrays

    def logits(self, dense: F32, feats: Features | None = None) -> F32:
        """Category logits then complexity logits, side by side."""
        out = ((dense - self.mean) / self.std) @ self.w_dense + self.bias
        if feats is not None and self.w_bag is not None:
            for idx, owner, scale in feats.bag:
                out += segment_sum(self.w_bag[idx], owner, feats.n) * scale[:, None]
        return out.astype(np.float32, copy=False)

    def probabilities(self, dense: F32, feats: Features | None = None) -> tuple[F64, F64]:
        """Softmax over categories and over complexities."""
        z = self.logits(dense, feats).astype(np.float64)
        return softmax(z[:, : self.n_categories]), softmax(z[:, self.n_categories :])


class FastHead:
    """Serving form of a LinearHead, exact up to float rounding, built once per engine.

    Standardisation folds into the weights and bias. The mean-pooled block is linear in the
    tokens, so each vocabulary token carries its precomputed logit row; with the bag's n-gram
    rows that is one 10-wide gather per feature from one compact table (only the rows the
    training data used, a few MB: it stays in cache). Only max pooling needs embeddings, and
    over the 64-wide projection.
    """

    def __init__(self, head: LinearHead, encoder: StaticEncoder) -> None:
        if head.w_bag is None:
            raise ArtifactError("the CPU engine's head has no bag weights")
        dim, k = encoder.dim, encoder.max_dim
        w = head.w_dense / head.std[:, None]
        self.bias: F32 = (head.bias - (head.mean / head.std) @ head.w_dense).astype(np.float32)
        self.w_peak: F32 = np.ascontiguousarray(w[dim : dim + k])
        self.w_stats: F32 = np.ascontiguousarray(w[dim + k :])
        token_rows = encoder.embeddings @ w[:dim]
        used = np.flatnonzero(np.any(head.w_bag != 0, axis=1))
        # Unused buckets (never seen in training, weight exactly zero) all share one zero row.
        self.lookup = np.full(head.w_bag.shape[0], encoder.vocab_size + used.shape[0], np.int32)
        self.lookup[used] = np.arange(used.shape[0], dtype=np.int32) + encoder.vocab_size
        width = head.w_bag.shape[1]
        table = np.vstack([token_rows, head.w_bag[used], np.zeros((1, width))])
        # Row-major: a feature's 10 logits share one cache line, so a gather from a cold table
        # misses once per feature, not once per class (measured ~35% faster than class-major).
        self.table: F32 = np.ascontiguousarray(table, dtype=np.float32)
        self.encoder = encoder
        self.n_categories = head.n_categories
        self.width = int(width)
        self._compiled = _load_compiled(self) if _native is not None else None

    @property
    def kernel(self) -> str:
        """Which path computes the logits: `compiled` (_cpu_head.c) or `numpy`."""
        return "numpy" if self._compiled is None else "compiled"

    def logits(self, texts: Sequence[str]) -> F32:
        """Category then complexity logits of `texts` (a batch of any size)."""
        if self._compiled is None:
            return self.numpy_logits(texts)
        texts, enc = list(texts), self.encoder
        out = np.empty((len(texts), self.width), dtype=np.float32)
        _native.logits(
            self._compiled, texts, [t[:CHAR_LIMIT].lower() for t in texts],
            [prompt_words(t) for t in texts], enc.word_cache, enc.learn_missing, out,
        )
        return out

    def numpy_logits(self, texts: Sequence[str]) -> F32:
        """`logits` in numpy: the reference of the compiled path, and its fallback."""
        enc = self.encoder
        n = len(texts)
        tokens = enc.tokens(texts)
        ids, owner = tokens.ids, tokens.owner
        counts = np.bincount(owner, minlength=n)
        out = pool(enc.projected[ids], counts, np.maximum) @ self.w_peak
        out += enc.stats(texts, counts) @ self.w_stats + self.bias
        parts = [(ids, owner, _inv_count(counts)), *enc.bag(texts, tokens, counts)]
        # Part 0 indexes the token rows directly; the bag parts go through the compact lookup.
        rows = np.concatenate([ids, *(self.lookup[idx] for idx, _, _ in parts[1:])])
        add_parts(out, self.table.take(rows, axis=0), parts)
        return out.astype(np.float32, copy=False)

    def probabilities(self, texts: Sequence[str]) -> tuple[F64, F64]:
        """Softmax over categories and over complexities."""
        z = self.logits(texts).astype(np.float64)
        return softmax(z[:, : self.n_categories]), softmax(z[:, self.n_categories :])


def compiled_head_inputs(head: FastHead) -> tuple[list[npt.NDArray[Any]], tuple[int, ...]]:
    """What _cpu_head.c's `load_head` takes: FastHead's tables in the C types it reads, and
    the sizes, offsets and hash constants of this module and the lexicon."""
    enc = head.encoder
    keys, starts, concepts = enc.lexicon.phrase_table()
    f32 = np.float32
    arrays: list[npt.NDArray[Any]] = [
        head.table, np.ascontiguousarray(enc.projected, f32),
        np.ascontiguousarray(head.w_peak, f32), np.ascontiguousarray(head.w_stats, f32),
        np.ascontiguousarray(head.bias, f32),
        np.ascontiguousarray(head.lookup, np.int32), np.ascontiguousarray(keys, np.uint64),
        np.ascontiguousarray(starts, np.int64), np.ascontiguousarray(concepts, np.int64),
    ]
    params = (
        head.width, enc.max_dim, enc.vocab_size, enc.unk_id, MAX_TOKENS,
        enc.vocab_size, BIGRAM_BUCKETS, enc.vocab_size + BIGRAM_BUCKETS, CHAR_BUCKETS,
        enc.word_offset, enc.word_offset + WORD_BUCKETS, MAX_PHRASE_WORDS,
        int(_CHAR_PRIME), int(_BIGRAM_MULT), int(PHRASE_MULT), int(_HASH_SHIFT),
    )
    return arrays, params


def _load_compiled(head: FastHead) -> object:
    """FastHead's tables handed to _cpu_head.c (held there, not copied)."""
    arrays, params = compiled_head_inputs(head)
    return _native.load_head(arrays, params, CHAR_NGRAMS)


def softmax(z: F64) -> F64:
    """Row-wise softmax, stable for large logits."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def to_predictions(
    p_cat: F64, p_cx: F64, categories: Sequence[str], complexities: Sequence[str], tier: Tier
) -> list[Prediction]:
    """One Prediction per row; argmax and max are vectorised, only the objects are per item."""
    cat_idx = p_cat.argmax(axis=1).tolist()
    cx_idx = p_cx.argmax(axis=1).tolist()
    conf = p_cat.max(axis=1).tolist()
    cx_conf = p_cx.max(axis=1).tolist()
    return [
        Prediction(
            category=categories[c],
            complexity=complexities[k],
            confidence=f,
            scores=dict(zip(categories, row, strict=True)),
            complexity_confidence=g,
            tier=tier,
        )
        for c, k, f, g, row in zip(cat_idx, cx_idx, conf, cx_conf, p_cat.tolist(), strict=True)
    ]


class CpuEngine:
    """The default engine: fast static stage, optional full-encoder second stage."""

    name = ENGINE_NAME

    def __init__(
        self,
        artifact: Artifact,
        encoder: StaticEncoder,
        *,
        second_stage: Any | None = None,
        threshold: float = 0.5,
    ) -> None:
        meta = artifact.meta
        self._version = meta.version
        self.static_model_hash = meta.static_model_hash
        self.categories = tuple(meta.labels.categories)
        self.complexities = tuple(meta.labels.complexities)
        self.encoder = encoder
        self.head = LinearHead.from_arrays(artifact.arrays, "", len(self.categories))
        self._check_shapes(encoder)
        self.fast = FastHead(self.head, encoder)
        self.second_stage = second_stage
        self.threshold = threshold

    def _check_shapes(self, encoder: StaticEncoder) -> None:
        width = len(self.categories) + len(self.complexities)
        if self.head.w_dense.shape != (encoder.dense_width(), width):
            raise ArtifactError(
                f"head expects {self.head.w_dense.shape[0]} dense features, static model gives "
                f"{encoder.dense_width()}; retrain with this static model"
            )
        if self.head.w_bag is not None and self.head.w_bag.shape != (encoder.bag_size(), width):
            raise ArtifactError("head bag size does not match the static model's vocabulary")

    @property
    def version(self) -> str:
        """The artifact version stamped on decisions."""
        return self._version

    @property
    def releases_gil(self) -> bool:
        """With the encoder second stage much of a batch's time is torch, which runs without
        the GIL; the numpy fast stage alone holds it (see `Cascade`)."""
        return self.second_stage is not None

    def probabilities(self, texts: Sequence[str]) -> tuple[F64, F64]:
        """Category and complexity probabilities of the fast stage.

        Large batches run in chunks: the gathered token and n-gram rows of a few hundred
        prompts stay in cache, where one 512-prompt gather measurably does not.
        """
        if len(texts) > CHUNK:
            parts = [self.probabilities(texts[i : i + CHUNK]) for i in range(0, len(texts), CHUNK)]
            return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])
        return self.fast.probabilities(texts)

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Classify a batch; unsure rows go to the second stage when it is on."""
        if not texts:
            return []
        p_cat, p_cx = self.probabilities(texts)
        predictions = to_predictions(
            p_cat, p_cx, self.categories, self.complexities, Tier.CLASSIFIER
        )
        if self.second_stage is None:
            return predictions
        unsure = np.flatnonzero(p_cat.max(axis=1) < self.threshold).tolist()
        if unsure:
            redo = self.second_stage.classify([texts[i] for i in unsure])
            for i, prediction in zip(unsure, redo, strict=True):
                predictions[i] = prediction
        return predictions


def training_vocabulary(prompts: Iterable[str], limit: int = VOCABULARY_MAX) -> list[str]:
    """The words (as `StaticEncoder.tokens` splits them) of `prompts`, most frequent first,
    without the words that hold a digit."""
    counts = Counter(
        word for prompt in prompts for word in prompt_words(prompt) if cached_at_first_sight(word)
    )
    return [word for word, _ in counts.most_common(limit)]


def vocabulary_arrays(words: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
    """The vocabulary as an artifact extra: one UTF-8 blob, words split by newlines (a word
    from str.split() never holds one), so no word length pads the file."""
    blob = "\n".join(words).encode("utf-8", "surrogatepass")
    return {"words": np.frombuffer(blob, dtype=np.uint8)}


def vocabulary_from_arrays(arrays: Mapping[str, npt.NDArray[Any]]) -> list[str]:
    """Inverse of `vocabulary_arrays`; ArtifactError when the file is not one."""
    try:
        blob = np.asarray(arrays["words"], dtype=np.uint8).tobytes()
        return blob.decode("utf-8", "surrogatepass").split("\n") if blob else []
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{VOCABULARY_FILE} holds no vocabulary: {exc}") from exc


def load_cpu_engine(
    artifact_path: Path,
    static_model: Path,
    *,
    threads: int = 1,
    encoder_stage: bool = False,
    verify_hash: bool = True,
    previous: CpuEngine | None = None,
) -> CpuEngine:
    """Load the CPU engine; ArtifactError when the artifact or static model is unusable.

    `previous`, the engine a hot reload replaces, lends its word cache when both were
    verified against the same static model: the reload then learns only the vocabulary words
    traffic has not taught it yet, and its first batches find the live words known.
    """
    configure_threads(threads)
    artifact = load_artifact(artifact_path)
    if artifact.meta.engine != ENGINE_NAME:
        raise ArtifactError(
            f"artifact {artifact.meta.version} is for engine {artifact.meta.engine}"
        )
    if verify_hash and hash_dir(static_model) != artifact.meta.static_model_hash:
        raise ArtifactError(
            f"artifact {artifact.meta.version} was trained on another static model than "
            f"{static_model}; rebuild the model or retrain"
        )
    lexicon = LEXICON.digest
    if artifact.meta.lexicon_hash is not None and artifact.meta.lexicon_hash != lexicon:
        raise ArtifactError(
            f"artifact {artifact.meta.version} was trained with another intent lexicon than "
            "this worker's (router_worker/classify/lexicon_terms.py); retrain"
        )
    second = _second_stage(artifact, threads) if encoder_stage else None
    threshold = float(artifact.meta.params.get("encoder_threshold", 0.5))
    engine = CpuEngine(
        artifact, StaticEncoder(static_model), second_stage=second, threshold=threshold
    )
    if (
        previous is not None
        and verify_hash
        and previous.encoder.model_dir == static_model
        and previous.static_model_hash == artifact.meta.static_model_hash
    ):
        engine.encoder.adopt_words(previous.encoder)
    vocabulary = read_extra(artifact, VOCABULARY_FILE)  # artifacts before it have none
    learned = (
        engine.encoder.prelearn(vocabulary_from_arrays(vocabulary)) if vocabulary else 0
    )
    log.info(
        "engine_loaded", engine=ENGINE_NAME, version=engine.version,
        second_stage=second is not None, prelearned_words=learned, cpu_head=engine.fast.kernel,
    )
    return engine


def _second_stage(artifact: Artifact, threads: int) -> Any | None:
    arrays = read_extra(artifact, ENCODER_HEAD_FILE)
    if arrays is None:
        log.warning("encoder_stage_unavailable", reason="artifact has no encoder head")
        return None
    from router_worker.classify.encoder import EncoderEngine  # needs the ml extra
    from router_worker.errors import EngineUnavailable

    try:
        return EncoderEngine.from_artifact(artifact, arrays, threads=threads)
    except EngineUnavailable as exc:
        log.warning("encoder_stage_unavailable", reason=str(exc))
        return None
