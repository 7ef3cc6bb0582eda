"""Turn a query into the sparse features the complexity classifier reads (pure, no I/O).

Features describe what a query asks for more than what it is about: words and word pairs, the
opening words (which carry the question's form), crude stems that join "derive"/"derivation",
and the query's shape (length, sentences, questions, code, numbers, lists). Topic words are
dropped at training time when they occur in too few domains (see train.py), so what is left
transfers to domains the training data never saw.
"""

from __future__ import annotations

import itertools
import re

_CODE_FENCE = re.compile(r"```")
_CODE_LINE = re.compile(r"^\s*(def |class |import |#include|for .* in |[a-z_]+\(.*\)\s*$)|[;{]\s*$",
                        re.MULTILINE)
_WORD = re.compile(r"[a-z][a-z']*|\d+(?:[.,]\d+)*|[?!=+*/^<>≤≥∑∫√∂]")
_SENTENCE_END = re.compile(r"[.!?]+(\s|$)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)

# A pasted attachment (a log, a data dump, a long code listing) must not decide the label: the
# judge reads the start of the message, where people say what they want, and its end, where
# they usually ask the question.
HEAD_CHARS = 1200
TAIL_CHARS = 400


def clip(text: str) -> str:
    if len(text) <= HEAD_CHARS + TAIL_CHARS:
        return text
    return text[:HEAD_CHARS] + " \n " + text[-TAIL_CHARS:]


def _bucket(n: int, edges: tuple[int, ...]) -> int:
    for i, edge in enumerate(edges):
        if n <= edge:
            return i
    return len(edges)


def tokens(text: str) -> list[str]:
    """Lower-cased words, with every number folded to 0 (its size says nothing about effort)."""
    out = []
    for tok in _WORD.findall(text.lower()):
        out.append("0" if tok[0].isdigit() else tok.strip("'"))
    return [t for t in out if t]


def shape_features(text: str, words: list[str]) -> list[str]:
    """The query's form: always kept, whatever the domain filter says."""
    n_words = sum(1 for w in words if w[0].isalpha())
    feats = [
        f"#len{_bucket(n_words, (3, 7, 12, 20, 35, 60, 100))}",
        f"#q{_bucket(text.count('?'), (0, 1, 2))}",
        f"#sent{_bucket(len(_SENTENCE_END.findall(text)), (0, 1, 2, 4))}",
        f"#num{_bucket(words.count('0'), (0, 2, 6))}",
        f"#lines{_bucket(text.count(chr(10)), (0, 2, 8))}",
    ]
    if _CODE_FENCE.search(text) or _CODE_LINE.search(text):
        feats.append("#code")
    if _LIST_ITEM.search(text):
        feats.append("#list")
    commas = text.count(",") + text.count(";")
    feats.append(f"#commas{_bucket(commas, (0, 2, 5))}")
    if text[:1].islower():
        feats.append("#lowerstart")
    return feats


def extract(text: str) -> list[str]:
    """Every feature of a query, each once."""
    text = clip(text.strip())
    words = tokens(text)
    feats = shape_features(text, words)
    lead = [w for w in words[:3]]
    if lead:
        feats.append("^" + lead[0])
        if len(lead) > 1:
            feats.append("^" + lead[0] + "_" + lead[1])
    for w in words:
        feats.append("w:" + w)
        if len(w) >= 6 and w[0].isalpha():
            feats.append("s:" + w[:5])
    for a, b in itertools.pairwise(words):
        feats.append("b:" + a + "_" + b)
    return list(dict.fromkeys(feats))
