# Types of the compiled CPU head (_cpu_head.c); cpu.py's FastHead is its only user.
from collections.abc import Sequence
from typing import Any

def load_head(
    arrays: Sequence[Any], params: tuple[int, ...], sizes: tuple[int, ...], /
) -> object: ...
def logits(
    head: object, texts: list[str], lowered: list[str], entries: list[tuple[int, ...]],
    n_words: list[int], out: Any, /
) -> None: ...
