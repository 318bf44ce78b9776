"""The keyword/fuzzy tier: typo-tolerant phrase matching, the cascade's safety net."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

import numpy as np
from rapidfuzz import fuzz, process

from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig, load_config
from router_worker.events import CATEGORIES, Tier
from router_worker.settings import Settings

# Matching cost grows with text length; intent is almost always stated early.
_MAX_CHARS = 1500
_FUZZY_CUTOFF = 88.0
_EXACT = 100.0
_COMPLEX_WORDS = re.compile(
    r"\b(step[- ]by[- ]step|in detail|detailed|comprehensive|compare|design|architect\w*|prove|"
    r"derive|analy[sz]e|trade-?offs?|optimi[sz]e|multi-?step|production|scalab\w*|"
    r"thorough|essay|report|plan)\b",
    re.IGNORECASE,
)
_STRUCTURE = re.compile(r"```|^\s*(?:\d+[.)]|[-*])\s", re.MULTILINE)


def estimate_complexity(text: str) -> tuple[str, float]:
    """Simple/complex from length and structural cues, with a rough confidence."""
    words = len(text.split())
    cues = len(_COMPLEX_WORDS.findall(text[:_MAX_CHARS])) + len(_STRUCTURE.findall(text[:4000]))
    questions = text.count("?")
    score = words / 60 + 0.5 * cues + 0.25 * max(questions - 1, 0)
    if score >= 1.0:
        return "complex", min(0.5 + score / 4, 0.95)
    return "simple", min(0.5 + (1 - score) / 2, 0.95)


class KeywordEngine:
    """Fuzzy phrase matching over per-category phrase lists from the routing config."""

    name = "keyword"

    def __init__(self, phrases: Mapping[str, Sequence[str]], default_category: str = "chat") -> None:
        self._phrases: list[str] = []
        owners: list[int] = []
        for index, category in enumerate(CATEGORIES):
            for phrase in phrases.get(category, ()):
                self._phrases.append(phrase.lower())
                owners.append(index)
        # owner matrix: phrase -> category one-hot, so scores aggregate with one matmul.
        self._owner = np.zeros((len(self._phrases), len(CATEGORIES)), dtype=np.float32)
        self._owner[np.arange(len(owners)), owners] = 1.0
        self._default = default_category
        digest = hashlib.sha256("\n".join(self._phrases).encode()).hexdigest()[:8]
        self._version = f"keyword-{digest}"

    @property
    def version(self) -> str:
        """Hash of the phrase lists."""
        return self._version

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Score every text against every phrase at once; best category wins."""
        if not texts:
            return []
        clipped = [t[:_MAX_CHARS].lower() for t in texts]
        if not self._phrases:
            return [self._fallback(t) for t in texts]
        sim = process.cdist(
            clipped, self._phrases, scorer=fuzz.partial_ratio, score_cutoff=_FUZZY_CUTOFF,
            dtype=np.uint8, workers=1,
        ).astype(np.float32)
        exact = (sim >= _EXACT).astype(np.float32) @ self._owner
        weighted = (sim / 100.0) @ self._owner
        return [self._predict(texts[i], weighted[i], exact[i]) for i in range(len(texts))]

    def _predict(self, text: str, weighted: np.ndarray, exact: np.ndarray) -> Prediction:
        if not weighted.any():
            return self._fallback(text)
        # Exact hits count double so a clean match beats several near-misses.
        total = weighted + exact
        best = int(total.argmax())
        probs = total / total.sum()
        complexity, complexity_conf = estimate_complexity(text)
        confidence = float(min(0.4 + 0.6 * probs[best], 0.95))
        return Prediction(
            category=CATEGORIES[best],
            complexity=complexity,
            confidence=confidence,
            scores={c: float(p) for c, p in zip(CATEGORIES, probs, strict=True)},
            complexity_confidence=complexity_conf,
            tier=Tier.KEYWORD if exact[best] > 0 else Tier.FUZZY,
        )

    def _fallback(self, text: str) -> Prediction:
        complexity, complexity_conf = estimate_complexity(text)
        uniform = 1.0 / len(CATEGORIES)
        return Prediction(
            category=self._default,
            complexity=complexity,
            confidence=uniform,
            scores=dict.fromkeys(CATEGORIES, uniform),
            complexity_confidence=complexity_conf,
            tier=Tier.DEFAULT,
        )


def keyword_engine_from_config(config: RoutingConfig) -> KeywordEngine:
    """The keyword tier configured by `config.keywords`."""
    return KeywordEngine(config.keywords, config.default_category)


def load_keyword_engine(settings: Settings) -> KeywordEngine:
    """The keyword tier for the routing config named in settings."""
    return keyword_engine_from_config(load_config(settings.config))
