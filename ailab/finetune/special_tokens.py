"""Special tokens that llama-finetune can read: private aliases in the training copy.

llama-server renders a chat with the template and tokenizes the result with special
tokens parsed, so `<|im_end|>` is one token, the one that ends a turn. llama-finetune
tokenizes its text file with special tokens *not* parsed, so the same text would become
six ordinary tokens and the model would never learn to stop. Marking the tokens as
user-defined (which the plain tokenizer does match) is not enough either: llama.cpp
forces any token *named* `<|im_end|>`, `<end_of_turn>`, ... back to control type.

So the F32 training copy renames every control and user-defined token to an alias of the
same UTF-8 length that starts with a private-use character, and marks it user-defined;
the training text carries the aliases where the template wrote the tokens. Both tokenize
to the same ids llama-server produces. The trained file gets the original names and
types back before it is served.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ailab.gguf_meta import GgufInfo, patch_vocabulary

CONTROL, USER_DEFINED = 3, 4
SPECIAL_TYPES = (CONTROL, USER_DEFINED)
# Bump when the aliases change: cached training copies carry it in their name.
ALIAS_SCHEME = 1


def _code_points(bmp: bool) -> Iterator[int]:
    # The Basic Multilingual Plane's private-use area is 3 bytes in UTF-8; plane 15's is 4.
    yield from range(0xE000, 0xF900) if bmp else range(0xF0000, 0xFFFFE)


def aliases(info: GgufInfo) -> dict[int, str]:
    """Token id -> alias for every special token (ids are stable, so this is too)."""
    three_bytes, four_bytes = _code_points(bmp=True), _code_points(bmp=False)
    result: dict[int, str] = {}
    for token_id, (text, kind) in enumerate(zip(info.tokens, info.token_types, strict=True)):
        length = len(text.encode())
        if kind not in SPECIAL_TYPES or length < 3:
            continue
        lead = next(three_bytes, None)
        if lead is None and length >= 4:
            lead = next(four_bytes, None)
        if lead is None:
            continue  # past 6,400 special tokens, a 3-byte one has no alias left
        head = chr(lead)
        result[token_id] = head + "~" * (length - len(head.encode()))
    return result


def alias_training_copy(info: GgufInfo, names: dict[int, str]) -> None:
    """Rename the special tokens of a training copy (in place) and make them user-defined."""
    types = list(info.token_types)
    for token_id in names:
        types[token_id] = USER_DEFINED
    patch_vocabulary(info, names, types)


def restore_vocabulary(trained: GgufInfo, base: GgufInfo, names: dict[int, str]) -> None:
    """Give a trained file (in place) the base model's token names and types back."""
    patch_vocabulary(
        trained, {token_id: base.tokens[token_id] for token_id in names}, base.token_types
    )


class Substitution:
    """Replaces each special token's text with its alias in rendered training text."""

    def __init__(self, base: GgufInfo, names: dict[int, str]) -> None:
        self._alias = {base.tokens[token_id]: alias for token_id, alias in names.items()}
        # Longest first, as llama.cpp matches special tokens.
        ordered = sorted(self._alias, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: self._alias[match.group(0)], text)
