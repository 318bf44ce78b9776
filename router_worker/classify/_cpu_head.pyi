# Types of the compiled CPU head (_cpu_head.c); cpu.py's FastHead is its only user.
from collections.abc import Callable, Sequence
from typing import Any

def load_head(
    arrays: Sequence[Any], params: tuple[int, ...], sizes: tuple[int, ...], /
) -> object: ...
def logits(
    head: object, texts: list[str], lowered: list[str], words: list[list[str]],
    cache: dict[str, tuple[int, ...]],
    learn: Callable[[list[str]], dict[str, tuple[int, ...]]], out: Any, /
) -> None: ...
def load_wordpiece(vocab: dict[str, int], prefix: str, unk: int, max_chars: int, /) -> object: ...
def wordpieces(wordpiece: object, words: list[str], /) -> list[list[int] | None]: ...
