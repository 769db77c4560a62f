"""Final-answer extractors for self-consistency: text -> the answer to vote on (None: no answer)."""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def boxed_answer(text: str) -> str | None:
    """The contents of the last \\boxed{...} (braces may nest), stripped."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # never closed (cut by max_tokens)


def last_number(text: str) -> str | None:
    """The last number in the text, normalised (thousands commas dropped, "3.0" -> "3")."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def default_answer(text: str) -> str | None:
    """\\boxed{} if the sample boxed its answer, else the last number in it."""
    boxed = boxed_answer(text)
    return boxed if boxed is not None else last_number(text)


EXTRACTORS = {"default": default_answer, "boxed": boxed_answer, "last_number": last_number}
