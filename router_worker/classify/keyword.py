"""The keyword/fuzzy tier: typo-tolerant phrase matching, the cascade's safety net."""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from rapidfuzz import fuzz, process

from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig, load_config
from router_worker.errors import EngineUnavailable
from router_worker.events import CATEGORIES, Tier
from router_worker.settings import Settings

if TYPE_CHECKING:
    from router_worker.classify._keyword_scan import Trie

try:  # built from _keyword_scan.c where the install found a C compiler (see setup.py)
    from router_worker.classify import _keyword_scan as _native
except ImportError:  # pragma: no cover - exercised only on installs without a compiler
    _native = None  # type: ignore[assignment]

# Matching cost grows with text length; intent is almost always stated early.
_MAX_CHARS = 1500
_FUZZY_CUTOFF = 85.0
_MIN_FUZZY_LEN = 5
_WORD = re.compile(r"[^\W\d_]{5,}")
# On ASCII text (most prompts) those letters are a-z after lower-casing, and a plain class
# matches several times faster than the Unicode category test; the results are identical.
_ASCII_WORD = re.compile(r"[a-z]{5,}")
# Matched against lower-cased text: case-insensitive matching costs twice as much. The lookahead
# skips positions that cannot start a cue cheaply (keep it in step with the first letters).
_COMPLEX_WORDS = re.compile(
    r"\b(?=[acdeimoprst])(step[- ]by[- ]step|in detail|detailed|comprehensive|compare|design|"
    r"architect\w*|prove|derive|analy[sz]e|trade-?offs?|optimi[sz]e|multi-?step|production|"
    r"scalab\w*|thorough|essay|report|plan)\b",
)
# The cues above as literals for the compiled scan, a trailing "*" standing for the regex's
# `\w*`. The regex stays the reference: tests check both count the same on every text.
_CUE_LITERALS = (
    *(f"step{a}by{b}step" for a in "- " for b in "- "),
    "in detail", "detailed", "comprehensive", "compare", "design", "architect*", "prove",
    "derive", "analyse", "analyze", *(f"trade{h}off{s}" for h in ("-", "") for s in ("s", "")),
    "optimise", "optimize", "multi-step", "multistep", "production", "scalab*", "thorough",
    "essay", "report", "plan",
)
_STRUCTURE = re.compile(r"```|^\s*(?:\d+[.)]|[-*])\s", re.MULTILINE)
_STRUCTURE_CHARS = 4000  # _keyword_scan.c has the same bound
_LIST_START = re.compile(r"\s*(?:\d+[.)]|[-*])\s")
# A prompt without a phrase hit gets the default category with uniform scores (one shared,
# read-only mapping).
_UNIFORM = 1.0 / len(CATEGORIES)
_UNIFORM_SCORES: Mapping[str, float] = MappingProxyType(dict.fromkeys(CATEGORIES, _UNIFORM))
# Words seen before skip the fuzzy matcher: natural language reuses a small vocabulary, so after
# warm-up almost every word is a dictionary hit. Cleared when full, so memory stays bounded.
_FUZZY_MEMO_MAX = 200_000


def phrase_pattern(phrases: Sequence[str]) -> str:
    """One regex alternation for many phrases, factored into a trie of common prefixes.

    Python's `re` tries each branch of a flat alternation at every position; a trie makes the
    work per position proportional to the longest match instead (about 5x faster here).
    """
    trie: dict[str, Any] = {}
    for phrase in phrases:
        node = trie
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}  # end of a phrase

    def emit(node: dict[str, Any]) -> str:
        ends = "" in node
        branches = [re.escape(c) + emit(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends:  # a phrase ends here and longer ones continue: prefer the longer (greedy)
            body = f"(?:{body})?"
        return body

    return emit(trie)


def flatten_trie(literals: Sequence[tuple[str, bool]]) -> tuple[bytes, bytes]:
    """A trie of `literals` in the layout the compiled scan loads (see _keyword_scan.c).

    Literal i gets id i; a true flag lets it take the word characters after it (`\\w*`).
    Returns the node table (first edge, edge count, id or -1, tail flag per node; the root
    first) and the edge table (code point, child per edge; sorted within each node).
    """
    children: list[dict[str, int]] = [{}]
    ends = [(-1, 0)]
    for index, (literal, tail) in enumerate(literals):
        node = 0
        for char in literal:
            if char not in children[node]:
                children[node][char] = len(children)
                children.append({})
                ends.append((-1, 0))
            node = children[node][char]
        if ends[node][0] < 0:  # a repeated literal keeps its first id
            ends[node] = (index, int(tail))
    nodes, edges = array("i"), array("i")
    for node, branches in enumerate(children):
        nodes.extend((len(edges) // 2, len(branches), *ends[node]))
        for char in sorted(branches):
            edges.extend((ord(char), branches[char]))
    if nodes.itemsize != 4:  # pragma: no cover - C int is 32 bits wherever CPython builds
        raise RuntimeError("the compiled keyword scan needs 32-bit C ints")
    return nodes.tobytes(), edges.tobytes()


class TextScan(NamedTuple):
    """What the keyword tier reads from one prompt.

    Its words (runs of 5+ letters) are looked up in the engine's fuzzy memo as they are found:
    known near-misses land in `near`, words the memo has not seen in `fresh` (one entry per
    occurrence in both), and the many words known to be no near-miss nowhere.
    """

    phrases: list[int]  # exact phrase hits in text order, as indexes into the engine's phrases
    near: list[str]  # the phrase word each known near-miss word is a typo of
    fresh: list[str]  # words the fuzzy memo has not seen yet
    cues: int  # complexity cues (_COMPLEX_WORDS) in the clipped text
    word_count: int  # len(text.split()) of the whole text
    structure: int  # structure_cues(text): code fences and list items


def estimate_complexity(text: str, lowered: str | None = None) -> tuple[str, float]:
    """Simple/complex from length and structural cues, with a rough confidence.

    `lowered` is `text[:_MAX_CHARS].lower()` when the caller has it already.
    """
    if lowered is None:
        lowered = text[:_MAX_CHARS].lower()
    cues = len(_COMPLEX_WORDS.findall(lowered)) + structure_cues(text)
    return complexity_from(text, len(text.split()), cues)


def structure_cues(text: str) -> int:
    """Code fences and list items in the first _STRUCTURE_CHARS characters."""
    head = text[:_STRUCTURE_CHARS]
    if "\n" in head or "`" in head:
        return len(_STRUCTURE.findall(head))
    # one line, no fences: only the start can be a list item
    return 1 if _LIST_START.match(head) else 0


def complexity_from(text: str, word_count: int, cues: int) -> tuple[str, float]:
    """`estimate_complexity` once the words and the cues (words and structure) are counted."""
    questions = text.count("?")
    score = word_count / 60 + 0.5 * cues + 0.25 * max(questions - 1, 0)
    if score >= 1.0:
        return "complex", min(0.5 + score / 4, 0.95)
    return "simple", min(0.5 + (1 - score) / 2, 0.95)


def native_scan_available() -> bool:
    """Whether the compiled scan was built with this install (else the regexes run)."""
    return _native is not None


class KeywordEngine:
    """Phrase matching over per-category phrase lists from the routing config: exact phrases
    and complexity cues through one scan per prompt, typos through fuzzy matching of the
    batch's distinct words.

    The scan is compiled (_keyword_scan.c) where the install built it, else the regexes of
    this module; both give the same matches. `native=False` forces the regexes, `True`
    requires the compiled scan.
    """

    name = "keyword"

    def __init__(
        self, phrases: Mapping[str, Sequence[str]], default_category: str = "chat",
        native: bool | None = None,
    ) -> None:
        # phrase -> indexes of the categories that list it
        self._owner: dict[str, tuple[int, ...]] = {}
        for index, category in enumerate(CATEGORIES):
            for phrase in phrases.get(category, ()):
                if phrase.strip():  # a blank phrase would match the empty string between spaces
                    self._owner[phrase.lower()] = (*self._owner.get(phrase.lower(), ()), index)
        ordered = sorted(self._owner, key=len, reverse=True)  # longest phrase wins the match
        self._phrase_id = {phrase: i for i, phrase in enumerate(ordered)}
        self._owner_of = [self._owner[phrase] for phrase in ordered]  # by phrase id
        self._exact = (
            re.compile(r"(?<!\w)(" + phrase_pattern(ordered) + r")(?!\w)")
            if ordered
            else None
        )
        if native and _native is None:
            raise EngineUnavailable(
                "the compiled keyword scan is not built in this install (no C compiler or "
                "Python headers when it was installed); reinstall with both, or leave native unset"
            )
        self._tries: tuple[Trie, Trie] | None = None
        if _native is not None and native is not False:
            self._tries = (
                _native.load_trie(*flatten_trie([(p, False) for p in ordered])),
                _native.load_trie(*flatten_trie(
                    [(c.rstrip("*"), c.endswith("*")) for c in _CUE_LITERALS])),
            )
        # Typos are only plausible in longer single words ("kubernetse"); short ones collide.
        self._words = [p for p in ordered if " " not in p and len(p) >= _MIN_FUZZY_LEN]
        self._memo: dict[str, str | None] = {}  # word -> the phrase word it is a typo of
        self._default = default_category
        digest = hashlib.sha256("\n".join(sorted(self._owner)).encode()).hexdigest()[:8]
        self._version = f"keyword-{digest}"

    @property
    def version(self) -> str:
        """Hash of the phrase lists."""
        return self._version

    @property
    def native(self) -> bool:
        """Whether this engine scans with the compiled module."""
        return self._tries is not None

    def scan(self, text: str, lowered: str) -> TextScan:
        """One prompt's phrases, words, cues and word count; `lowered` is its clipped lower case."""
        if self._tries is not None:
            memo = self._memo if self._words else None
            return TextScan(*_native.scan(*self._tries, memo, text, lowered))
        return self.scan_reference(text, lowered)

    def scan_reference(self, text: str, lowered: str) -> TextScan:
        """`scan` through the regexes: the definition the compiled scan is tested against."""
        phrases = (
            [self._phrase_id[p] for p in self._exact.findall(lowered)] if self._exact else []
        )
        near: list[str] = []
        fresh: list[str] = []
        if self._words:  # without phrase words to be near, words need no look
            memo = self._memo
            for word in (_ASCII_WORD if lowered.isascii() else _WORD).findall(lowered):
                if word not in memo:
                    fresh.append(word)
                elif (phrase := memo[word]) is not None:
                    near.append(phrase)
        return TextScan(
            phrases, near, fresh, len(_COMPLEX_WORDS.findall(lowered)), len(text.split()),
            structure_cues(text),
        )

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Exact hits per text, plus one fuzzy pass over the new distinct words of the batch."""
        if not texts:
            return []
        clipped = [t[:_MAX_CHARS].lower() for t in texts]
        scans = [self.scan(text, lowered) for text, lowered in zip(texts, clipped, strict=True)]
        if any(scan.fresh for scan in scans):
            memo = self._match_fresh({word for scan in scans for word in scan.fresh})
            scans = [
                scan._replace(near=scan.near + [
                    phrase for word in scan.fresh if (phrase := memo[word]) is not None
                ], fresh=[]) if scan.fresh else scan
                for scan in scans
            ]
        return [self._predict(text, scan) for text, scan in zip(texts, scans, strict=True)]

    def _match_fresh(self, fresh: set[str]) -> dict[str, str | None]:
        """The fuzzy memo, after matching `fresh` (words it lacks) against the phrase words."""
        memo = self._memo
        if len(memo) + len(fresh) > _FUZZY_MEMO_MAX:
            memo.clear()
        vocab = sorted(fresh)
        memo.update(dict.fromkeys(vocab))
        sim = process.cdist(
            vocab,
            self._words,
            scorer=fuzz.ratio,
            score_cutoff=_FUZZY_CUTOFF,
            dtype=np.uint8,
            workers=1,
        )
        rows, cols = np.nonzero(sim)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if vocab[r] not in self._owner:  # an exact phrase is counted as exact, not fuzzy
                memo[vocab[r]] = self._words[c]
        return memo

    def _predict(self, text: str, scan: TextScan) -> Prediction:
        complexity, complexity_conf = complexity_from(text, scan.word_count,
                                                      scan.cues + scan.structure)
        if not scan.phrases and not scan.near:  # no vote: the default category
            return Prediction(
                category=self._default,
                complexity=complexity,
                confidence=_UNIFORM,
                scores=_UNIFORM_SCORES,
                complexity_confidence=complexity_conf,
                tier=Tier.DEFAULT,
            )
        # Exact hits count double so a clean match beats a near-miss.
        votes = [0] * len(CATEGORIES)
        for phrase_id in scan.phrases:
            for index in self._owner_of[phrase_id]:
                votes[index] += 2
        exact = votes.copy() if scan.near else votes
        owner = self._owner
        for near in scan.near:
            for index in owner[near]:
                votes[index] += 1
        mass = sum(votes)
        top = max(votes)
        best = votes.index(top)  # first of equals, like argmax
        return Prediction(
            category=CATEGORIES[best],
            complexity=complexity,
            confidence=min(0.4 + 0.6 * top / mass, 0.95),
            scores={c: v / mass for c, v in zip(CATEGORIES, votes, strict=True)},
            complexity_confidence=complexity_conf,
            tier=Tier.KEYWORD if exact[best] > 0 else Tier.FUZZY,
        )


def keyword_engine_from_config(config: RoutingConfig) -> KeywordEngine:
    """The keyword tier configured by `config.keywords`."""
    return KeywordEngine(config.keywords, config.default_category)


def load_keyword_engine(settings: Settings) -> KeywordEngine:
    """The keyword tier for the routing config named in settings."""
    return keyword_engine_from_config(load_config(settings.config))
