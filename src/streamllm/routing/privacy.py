"""Spot personal data and secrets in request text, so the router can keep such requests in-house.

Pure: text in, `Finding`s (kind and character span, never the matched text) out; no I/O.

Built-in kinds and what each accepts (everything else is deliberately left alone):

- ``email``: ``local@domain.tld`` with a dot in the domain and an alphabetic TLD. Not flagged:
  ``user@localhost``, ``@mentions``, ``@decorators``, ``icon@2x.png`` (file-extension "TLDs"),
  ``X@W.reshape(...)`` (a matmul followed by a call), ``git@github.com:...`` SSH remotes.
- ``phone``: ``+`` and 8-15 digits (country code included) in groups, or 10-15 unbroken; a
  North American ``(NXX) NXX-XXXX``; or ``NXX-NXX-XXXX`` / ``NXX.NXX.XXXX`` (one separator
  throughout, optional ``1-`` prefix). A bare run of digits is never a phone number.
- ``national_id``: three schemes only, each with its validity rules: US SSN ``AAA-GG-SSSS``
  (area not 000, 666 or 9xx; group not 00; serial not 0000); UK National Insurance number (two
  prefix letters allowed by HMRC, six digits, suffix A-D); Canadian SIN (3-3-3 digits split by
  spaces or dashes, Luhn-valid). Add other schemes as custom patterns.
- ``card``: 13-19 digits, unbroken or grouped 4-4-4-4(-3) or 4-6-5 by spaces or dashes,
  Luhn-valid, with a Visa, Mastercard, Amex or Discover prefix and a length that issuer uses.
- ``api_key``: known token formats (OpenAI/Anthropic ``sk-``, AWS ``AKIA``/``ASIA``, GitHub,
  Slack, Google ``AIza``, Hugging Face ``hf_``, Stripe live keys, JWTs),
  ``Authorization: Bearer <token>``, and ``api_key = ...``-style assignments of a 12+ character
  value that is not a placeholder or a reference to code, a file or the environment.
- ``private_key``: PEM private-key blocks (not public keys or certificates), PuTTY key files.

Custom patterns (name -> regex) report kind ``custom:<name>``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

BUILTIN_KINDS: tuple[str, ...] = ("email", "phone", "national_id", "card", "api_key", "private_key")


@dataclass(frozen=True)
class Finding:
    """Where sensitive data sits. Deliberately holds no matched text: findings get logged."""

    kind: str
    start: int
    end: int


Span = tuple[int, int]

# ASCII only: `[0-9]` and `\w` must not pick up other scripts (Luhn below assumes 0-9). Digits
# written in other scripts or full width are therefore not detected.
_A = re.ASCII


def _not_after(chars: str) -> str:
    """Regex: the character just matched is not preceded by any of `chars`.

    Placed after a pattern's first character rather than before it: a leading lookbehind stops
    the regex engine from skipping straight to plausible first characters, which makes a pass
    over ordinary text several times slower.
    """
    return f"(?<![{chars}].)"


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _only_digits(text: str) -> str:
    return "".join(ch for ch in text if "0" <= ch <= "9")


# =============================================================================================
# Numbers (phone, national_id, card). Each format is a "shape": a leading character and a tail.
# Shapes with the same lead share one regex pass (far cheaper than a pass each), and no two
# shapes can match at the same start, so sharing finds exactly what separate passes would.


@dataclass(frozen=True)
class _Shape:
    name: str  # group name in the shared regex; inner group names start with it
    kind: str
    lead: str  # regex for the first character, a key of _LEADS
    tail: str  # regex for the rest, beginning with any lookbehind of its own
    # Validity rules beyond the shape: how many leading characters of the match are the
    # finding (usually all or none).
    measure: Callable[[str], int]


_DIGIT = "[0-9]"
_NINO_LEAD = "[A-CEGHJ-PR-TW-Z]"  # first NINO letter: not D F I Q U V
# What may not come right before each lead: no format starts glued onto a word, and a digit-led
# one not after a decimal point, dash, slash or sign either (`3.141`, `2020-2021`, `10.1/x`).
_LEADS: dict[str, str] = {_DIGIT: r"\w.\-/+", r"\+": r"\w+.", r"\(": r"\w)", _NINO_LEAD: r"\w"}


def _phone_intl_ok(text: str) -> bool:
    digits = len(_only_digits(text)) - (1 if "(0)" in text else 0)  # (0): trunk prefix
    separated = any(ch in " .-()" for ch in text)
    # E.164 allows at most 15 digits; an unformatted `+` number shorter than 10 is more likely a
    # signed quantity than a phone.
    if digits > 15 or digits < (8 if separated else 10):
        return False
    # A single dot is a signed decimal (`+40.712812` latitude); dotted phones use several.
    return "." not in text or text.count(".") >= 2


def _ssn_ok(text: str) -> bool:
    area, group, serial = text.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# HMRC never issued these prefixes (the per-letter rules are in the regex classes).
_NINO_UNISSUED_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})


def _nino_ok(text: str) -> bool:
    return text[:2] not in _NINO_UNISSUED_PREFIXES


def _sin_ok(text: str) -> bool:
    return _luhn_ok(_only_digits(text))


def _issuer_accepts(digits: str) -> bool:
    n = len(digits)
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    two, three, four = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if 51 <= two <= 55 or 2221 <= four <= 2720:  # Mastercard
        return n == 16
    if two in (34, 37):  # American Express
        return n == 15
    if four == 6011 or two == 65 or 644 <= three <= 649:  # Discover
        return 16 <= n <= 19
    return False


def _card_ok(text: str) -> bool:
    digits = _only_digits(text)
    return 13 <= len(digits) <= 19 and _issuer_accepts(digits) and _luhn_ok(digits)


def _card_length(text: str) -> int:
    if _card_ok(text):
        return len(text)
    # `4111 1111 1111 1111 123`: a 16-digit card and its CVV rather than a 19-digit card.
    if len(text) == 23 and _card_ok(text[:19]):
        return 19
    return 0


def _all_or_none(check: Callable[[str], bool]) -> Callable[[str], int]:
    return lambda text: len(text) if check(text) else 0


def _always(text: str) -> int:
    return len(text)


# The number does not run on into a word, a decimal or a longer number.
_END = r"(?![\w]|[.\-/][0-9])"
# Not the tail of a longer space/comma/dash-grouped number (`1 234 567 890`).
_NOT_A_LATER_GROUP = r"(?<![0-9][ .,\-].)"

_SHAPES: tuple[_Shape, ...] = (
    # `+CC` then digit groups. Possessive, so a group running into more digits rejects the
    # candidate rather than backtracking to a shorter, phone-looking prefix.
    _Shape(
        "phone_intl", "phone", r"\+",
        r"[1-9][0-9]{0,2}(?:[ .\-]?\(0\))?(?:[ .\-]?(?:\([0-9]{1,4}\)|[0-9]{1,6})){1,7}+"
        r"(?![\w]|[.\-][0-9])",
        _all_or_none(_phone_intl_ok),
    ),
    # North American Numbering Plan: area code and exchange start with 2-9. Bare numbers take
    # dashes or dots only: with spaces, tables of numbers ("250 300 1000") would match.
    _Shape(
        "phone_parens", "phone", r"\(",
        r"[2-9][0-9]{2}\)[ .\-]?[2-9][0-9]{2}[ .\-][0-9]{4}" + _END,
        _always,
    ),
    _Shape(
        "phone_nanp", "phone", _DIGIT,
        r"(?<=[2-9])[0-9]{2}(?P<phone_nanp_sep>[.\-])[2-9][0-9]{2}(?P=phone_nanp_sep)"
        r"[0-9]{4}" + _END,
        _always,
    ),
    _Shape(
        "phone_nanp1", "phone", _DIGIT,
        r"(?<=1)(?P<phone_nanp1_sep>[.\-])[2-9][0-9]{2}(?P=phone_nanp1_sep)"
        r"[2-9][0-9]{2}(?P=phone_nanp1_sep)[0-9]{4}" + _END,
        _always,
    ),
    _Shape("ssn", "national_id", _DIGIT, r"[0-9]{2}-[0-9]{2}-[0-9]{4}" + _END,
           _all_or_none(_ssn_ok)),
    # Second letter not D F I O Q U V; spaces optional between groups.
    _Shape(
        "nino", "national_id", _NINO_LEAD,
        r"[A-CEGHJ-NPR-TW-Z] ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D](?!\w)",
        _all_or_none(_nino_ok),
    ),
    _Shape(
        "sin", "national_id", _DIGIT,
        r"(?<![,].)" + _NOT_A_LATER_GROUP + r"[0-9]{2}(?P<sin_sep>[ \-])[0-9]{3}(?P=sin_sep)"
        r"[0-9]{3}(?![\w]|[ .,\-][0-9])",
        _all_or_none(_sin_ok),
    ),
    _Shape(
        "card", "card", _DIGIT,
        # Unbroken, or grouped 4-4-4-4, 4-4-4-4-3 or 4-6-5 (Amex) with one kind of separator.
        _NOT_A_LATER_GROUP + r"(?:[0-9]{12,18}+|[0-9]{3}(?P<card_sep>[ \-])"
        r"(?:[0-9]{4}(?P=card_sep)[0-9]{4}(?P=card_sep)[0-9]{4}(?:(?P=card_sep)[0-9]{3})?"
        r"|[0-9]{6}(?P=card_sep)[0-9]{5}))"
        # Not one row of a table of four-digit groups; an expiry or CVV may follow.
        r"(?![\w]|(?P=card_sep)[0-9]{4}(?![0-9]))",
        _card_length,
    ),
)  # fmt: skip


def _compile_shapes(shapes: Iterable[_Shape]) -> list[re.Pattern[str]]:
    by_lead: dict[str, list[_Shape]] = {}
    for shape in shapes:
        by_lead.setdefault(shape.lead, []).append(shape)
    return [
        re.compile(
            lead + _not_after(_LEADS[lead])
            + "(?:" + "|".join(f"(?P<{s.name}>{s.tail})" for s in group) + ")",
            _A,
        )
        for lead, group in by_lead.items()
    ]  # fmt: skip


def _scan_numbers(
    pattern: re.Pattern[str], shapes: Mapping[str, _Shape], text: str, out: list[Finding]
) -> None:
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        shape = shapes[m.lastgroup or ""]
        length = shape.measure(m.group())
        if length:
            out.append(Finding(shape.kind, m.start(), m.start() + length))
            pos = m.start() + length
        else:
            # Retry just past the rejected start, as a pass of that shape alone would.
            pos = m.start() + 1


# =============================================================================================
# Anchored rules (email, api_key, private_key): every match contains a fixed literal, found with
# str.find on the lower-cased text (far cheaper than a regex alternation walking every
# position); a regex anchored at each hit then decides.

# Given the text and where an anchor was found: the span of the finding there, or None.
Locate = Callable[[str, int], Span | None]


@dataclass(frozen=True)
class _AnchoredRule:
    kind: str
    anchors: tuple[str, ...]  # lower-case literals
    locate: Locate


# ---- email


_EMAIL_DOMAIN = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+(?P<tld>[A-Za-z]{2,24})"
    # Not followed by more name characters, nor by a call or index (`X@W.reshape(`, `A@B.T[0]`).
    r"(?![\w\-(\[]|\.[A-Za-z0-9])",
    _A,
)
_EMAIL_LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-")
_EMAIL_LOCAL_MAX = 64  # RFC 5321
# Not TLDs, but `name@2x.png`-style asset names and `file@rev.txt` look just like addresses.
_FILE_EXTENSIONS = frozenset(
    ["png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff", "heic", "pdf", "txt", "csv", "tsv", "json", "yaml", "yml", "log", "ipynb", "tex"]
)


def _locate_email(text: str, at: int) -> Span | None:
    m = _EMAIL_DOMAIN.match(text, at)
    if m is None or m["tld"].lower() in _FILE_EXTENSIONS:
        return None
    start = at
    while start > 0 and at - start < _EMAIL_LOCAL_MAX and text[start - 1] in _EMAIL_LOCAL_CHARS:
        start -= 1
    while start < at and not text[start].isalnum():
        start += 1
    if start == at:  # `@mention`, `@decorator`
        return None
    # `git@github.com:org/repo.git`: the service account of every SSH git remote, not a person.
    if text[start:at].lower() == "git":
        return None
    return start, m.end()


# ---- api_key: known formats

# Values pasted instead of a real secret: `<your-key>`, `${VAR}`, `{{ secret }}`, `%(pw)s`,
# `xxxxxxxx`, `****`, `...`, `YOUR_API_KEY`, `changeme`. Checked with plain string operations:
# a value can be 1 KB long and a hostile text can hold thousands of them.
_PLACEHOLDER_OPENERS = tuple("<${%")
_PLACEHOLDER_FILLER = "xX*._-#•…"
_PLACEHOLDER_WORDS = (
    "your", "placeholder", "changeme", "replace", "redacted", "example", "dummy", "insert",
    "here", "xxxx", "***", "...", "…",
)  # fmt: skip
_DIGIT_RE = re.compile("[0-9]")
_LETTER_RE = re.compile("[A-Za-z]")


def _is_placeholder(value: str) -> bool:
    if value.startswith(_PLACEHOLDER_OPENERS) or not value.strip(_PLACEHOLDER_FILLER):
        return True
    lowered = value.lower()
    return any(word in lowered for word in _PLACEHOLDER_WORDS)


def _looks_random(value: str) -> bool:
    """A real token has variety and (in these formats, almost surely) a digit."""
    if _is_placeholder(value):
        return False
    return len(set(value)) >= 6 and _DIGIT_RE.search(value) is not None


_TOKEN = re.compile(
    r"(?:"
    r"(?P<openai>sk-(?:ant-|proj-|svcacct-|admin-)?)(?P<openai_body>[A-Za-z0-9_\-]{20,})"
    r"|(?P<aws>(?:AKIA|ASIA)[A-Z0-9]{16})"
    r"|(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[baprs]-[A-Za-z0-9\-]{10,}"
    r"|AIza[A-Za-z0-9_\-]{35}"
    r"|hf_[A-Za-z0-9]{30,}"
    r"|[sr]k_live_[A-Za-z0-9]{10,}"
    r"|(?P<jwt>eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})"
    r")(?![\w\-])",
    _A,
)
# Short and shared where possible: each anchor costs a str.find over the whole text, and a
# false hit ("ask", "high") is rejected in a fraction of that.
_TOKEN_ANCHORS = (
    "sk", "rk_live_", "akia", "asia", "gh", "github_pat_", "xox", "aiza", "hf_", "eyj",
)  # fmt: skip


def _glued_on(text: str, start: int) -> bool:
    """Whether `text[start:]` continues an identifier or word (`task-...`, `my_hf_...`)."""
    if start == 0:
        return False
    prev = text[start - 1]
    return prev.isalnum() or prev in "_-"


def _locate_token(text: str, at: int) -> Span | None:
    if _glued_on(text, at):
        return None
    m = _TOKEN.match(text, at)
    if m is None:
        return None
    if m["openai"] is not None:
        # The digit requirement also keeps prose like `sk-learn-compatible-estimators` out.
        return m.span() if _looks_random(m["openai_body"]) else None
    if m["aws"] is not None:
        # 16 base-32 characters need not contain a digit, so only reject obvious filler.
        body = m["aws"][4:]
        return m.span() if len(set(body)) >= 6 and "XXXX" not in body else None
    if m["jwt"] is not None:
        return m.span()
    return m.span() if _looks_random(m.group()) else None


# ---- api_key: Authorization header

_BEARER = re.compile(
    r"(?i)authorization[\"']?\s*[:=]\s*[\"']?bearer\s+(?P<token>[A-Za-z0-9._~+/\-]{20,}=*)"
    r"(?![\w\-])",
    _A,
)


def _locate_bearer(text: str, at: int) -> Span | None:
    m = _BEARER.match(text, at)
    return m.span("token") if m is not None and _looks_random(m["token"]) else None


# ---- api_key: `name = value` assignments

# The last word of a name (`api_key`, `DB_PASSWORD`, `clientSecret`, `token`), then `=`, `:`,
# `:=` or `=>`, then the value. The word must end the name (`max_tokens`, `token_type`,
# `tokenizer` are not secrets). An unquoted value stops at `:` or `=` (base64 padding aside): a
# URL is no secret, and a value can then never hold another assignment, which keeps text packed
# with `token=token=...` linear to scan. Values are read up to 1024 characters (a longer
# unquoted one is reported by its head).
_ASSIGNMENT = re.compile(
    r"(?i)(?P<word>key|secret|password|passwd|passphrase|token)(?![A-Za-z0-9])[\"']?\s*"
    r"(?::=|=>|[:=])\s*"
    r"(?:\"(?P<dq>[^\"\s]{12,1024})\"|'(?P<sq>[^'\s]{12,1024})'|(?P<bare>[^\s\"',;=:]{12,1024}=*))",
    _A,
)
# Unquoted, a value ends where the next URL query parameter starts, but may contain `&`.
_NEXT_QUERY_PARAMETER = re.compile(r"&[\w.\-]+=", _A)
_ASSIGNMENT_ANCHORS = ("key", "secret", "passw", "passphrase", "token")
# "key" alone is any dictionary key; only these make it a credential (`api_key`, `secretKey`).
_KEY_QUALIFIER = re.compile(r"(?i)(?:api|secret|access|private)[_\-]?\Z", _A)
# An unquoted value that names code rather than holding a secret: `tokenizer.eos_token`,
# `os.environ[...]`, `get_secret()`.
_CODE_REFERENCE = re.compile(r"^[A-Za-z_]\w*(?:(?:\.[A-Za-z_]\w*)+(?:[()\[\]].*)?|[(\[].*)$", _A)


def _starts_word(text: str, i: int) -> bool:
    """Whether a word starts at `i`: after a non-letter, or at a camelCase hump."""
    if i == 0:
        return True
    prev = text[i - 1]
    return not prev.isalpha() or (prev.islower() and text[i].isupper())


def _value_is_secret(value: str, quoted: bool) -> bool:
    if _is_placeholder(value):
        return False
    if quoted:
        return len(set(value)) >= 5
    # Unquoted values turn up in prose ("token: approximately four characters"), so ask for a
    # letter and a digit, and leave out paths and code.
    if value[0] in "/~" or _CODE_REFERENCE.match(value):
        return False
    return _DIGIT_RE.search(value) is not None and _LETTER_RE.search(value) is not None


def _locate_assignment(text: str, at: int) -> Span | None:
    m = _ASSIGNMENT.match(text, at)
    if m is None:
        return None
    word_start = at
    if m["word"].lower() == "key":
        qualifier = _KEY_QUALIFIER.search(text, max(0, at - 8), at)
        if qualifier is None:
            return None
        word_start = qualifier.start()
    if not _starts_word(text, word_start):  # glued onto a longer word: `mytoken`, `xpassword`
        return None
    for group in ("dq", "sq"):
        if m[group] is not None:
            return m.span(group) if _value_is_secret(m[group], quoted=True) else None
    start, end = m.span("bare")
    value = m["bare"]
    if (next_parameter := _NEXT_QUERY_PARAMETER.search(value)) is not None:
        value = value[: next_parameter.start()]
        end = start + len(value)
    if len(value) < 12 or not _value_is_secret(value, quoted=False):
        return None
    return start, end


# ---- private_key

# The span runs to the matching END line when the block is complete; a bare header still counts
# (pasted keys are often cut short). Public keys and certificates carry other labels. The body
# is searched only up to the next `-----`, so many headers in one text cost linear time.
_PEM_PRIVATE = re.compile(
    r"-----BEGIN (?P<label>(?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?)-----"
    r"(?:(?:[^-]|-(?!----))*+-----END (?P=label)-----)?",
    _A,
)
_PUTTY_PRIVATE = re.compile(r"PuTTY-User-Key-File-[0-9]+:[^\n]*", _A)


def _locate_regex(pattern: re.Pattern[str]) -> Locate:
    def locate(text: str, at: int) -> Span | None:
        m = pattern.match(text, at)
        return m.span() if m is not None else None

    return locate


_ANCHORED_RULES: tuple[_AnchoredRule, ...] = (
    _AnchoredRule("email", ("@",), _locate_email),
    _AnchoredRule("api_key", _TOKEN_ANCHORS, _locate_token),
    _AnchoredRule("api_key", ("authorization",), _locate_bearer),
    _AnchoredRule("api_key", _ASSIGNMENT_ANCHORS, _locate_assignment),
    _AnchoredRule("private_key", ("-----begin ",), _locate_regex(_PEM_PRIVATE)),
    _AnchoredRule("private_key", ("putty-user-key-file-",), _locate_regex(_PUTTY_PRIVATE)),
)


# Fallback lower-casing that never changes the length of the text (see scan()).
_ASCII_LOWER = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}


def _scan_anchored(rule: _AnchoredRule, text: str, lowered: str, out: list[Finding]) -> None:
    for anchor in rule.anchors:
        at = lowered.find(anchor)
        while at != -1:
            span = rule.locate(text, at)
            if span is not None:
                out.append(Finding(rule.kind, span[0], span[1]))
            at = lowered.find(anchor, at + 1 if span is None else max(at + 1, span[1]))


# =============================================================================================


class SensitiveDataDetector:
    """Finds personal data and secrets in text. Immutable after construction; thread-safe."""

    def __init__(
        self,
        custom_patterns: Mapping[str, str] | None = None,
        kinds: Iterable[str] | None = None,
    ):
        enabled = set(BUILTIN_KINDS if kinds is None else kinds)
        unknown = enabled.difference(BUILTIN_KINDS)
        if unknown:
            raise ValueError(
                f"unknown sensitive-data kind(s) {sorted(unknown)}; known: {list(BUILTIN_KINDS)}"
            )
        shapes = [shape for shape in _SHAPES if shape.kind in enabled]
        self._number_patterns = _compile_shapes(shapes)
        self._shapes = {shape.name: shape for shape in shapes}
        self._anchored = tuple(rule for rule in _ANCHORED_RULES if rule.kind in enabled)
        custom: list[tuple[str, re.Pattern[str]]] = []
        for name, source in (custom_patterns or {}).items():
            try:
                custom.append((f"custom:{name}", re.compile(source)))
            except re.error as exc:
                raise ValueError(f"custom pattern {name!r} is not a valid regex: {exc}") from exc
        self._custom = tuple(custom)

    def scan(self, text: str) -> list[Finding]:
        """Every finding in `text`, ordered by start; overlapping findings of one kind merged."""
        found: list[Finding] = []
        if self._number_patterns and any(d in text for d in "0123456789"):
            for pattern in self._number_patterns:
                _scan_numbers(pattern, self._shapes, text, found)
        if self._anchored:
            # Only used to find anchors: a hit is always re-checked on `text` itself, so the rare
            # character whose lower case differs in length (Turkish İ) cannot misplace a span.
            lowered = text.lower()
            if len(lowered) != len(text):
                lowered = text.translate(_ASCII_LOWER)
            for rule in self._anchored:
                _scan_anchored(rule, text, lowered, found)
        for kind, pattern in self._custom:
            for m in pattern.finditer(text):
                if m.end() > m.start():  # a zero-width match (`x*`) marks nothing
                    found.append(Finding(kind, m.start(), m.end()))
        return _merge_overlaps(found)

    def first(self, texts: Iterable[str]) -> Finding | None:
        """The first finding in the first text that has one; later texts are not scanned."""
        for text in texts:
            findings = self.scan(text)
            if findings:
                return findings[0]
        return None


def _merge_overlaps(findings: list[Finding]) -> list[Finding]:
    # Several rules can cover one secret (`export OPENAI_API_KEY=sk-...` is both an assignment
    # and an `sk-` key): report it once, as the union of the spans.
    findings.sort(key=lambda f: (f.start, -f.end, f.kind))
    merged: list[Finding] = []
    last_of_kind: dict[str, int] = {}
    for finding in findings:
        index = last_of_kind.get(finding.kind)
        if index is not None and finding.start < merged[index].end:
            previous = merged[index]
            if finding.end > previous.end:
                merged[index] = Finding(finding.kind, previous.start, finding.end)
            continue
        last_of_kind[finding.kind] = len(merged)
        merged.append(finding)
    return merged
