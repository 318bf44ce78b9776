# Types of the compiled keyword scan (_keyword_scan.c); keyword.py is its only user.
from typing import NewType

Trie = NewType("Trie", object)

def load_trie(nodes: bytes, edges: bytes, /) -> Trie: ...
def scan(
    phrases: Trie, cues: Trie, memo: dict[str, str | None] | None, text: str, lowered: str, /
) -> tuple[list[int], list[str], list[str], int, int, int]: ...
