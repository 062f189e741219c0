"""Meta Conversions API: user_data normalization + hashing, CRM events, upload planning.

Pure domain code (no Dagster, no HTTP, no files). The wire contract is CONTRACTS.md section 1;
where the official SDK (``facebook_business.adobjects.serverside``) and Meta's documentation
disagree, the documentation wins. Differences from the SDK, all deliberate:

- ``ph``: a number without an international prefix gets the default country's calling code
  (the SDK hashes it as typed); letters and every symbol are dropped (the SDK rejects them).
- ``country``: names and alpha-3 codes become the ISO alpha-2 code (the SDK raises).
- ``db``: other date spellings become ``YYYYMMDD`` (the SDK hashes them as given).
- ``fn``/``ln``: punctuation and symbols are dropped (the SDK keeps them).
- ``ct``: only letters are kept (the SDK drops only digits, ``.``, ``-``, ``(``, ``)``, spaces).
- ``st``: a state name of the default country becomes its 2-letter code.
- ``zp``: US ZIP+4 written without a dash keeps its first 5 digits.
- ``external_id`` is trimmed, lowercased and hashed (the SDK sends it as given).
- Invalid values are dropped (the SDK raises): an email without ``x@y.z`` shape, a phone with
  fewer than 7 or more than 15 digits, an unknown country, an impossible date, a gender other
  than m/f, a ``lead_id`` that is not 15-16 digits.
- ``lead_id`` is sent as a JSON integer (Meta's payload spec types it ``integer``).
- Hashed keys are always sent as lists (as the SDK does), deduplicated in input order.
- An already-hashed value is passed through only when it is a 64-hex SHA-256 digest (the SDK
  also passes 32-hex MD5 strings; Meta matches on SHA-256).

The vectorized frame path (``hash_identity_columns``) is bit-identical to
``normalize_user_data``: ASCII and Latin-letter values take polars expressions that implement
the same rules, and anything else (other scripts, exotic whitespace, phones the fast rules
cannot place, low-cardinality keys) goes through the scalar functions once per distinct value.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import phonenumbers
import polars as pl
import pycountry
from phonenumbers.phonemetadata import PhoneMetadata

# ---------------------------------------------------------------------------------------------
# Keys and constants

HASHED_KEYS = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id")
PASS_THROUGH_KEYS = (
    "client_ip_address",
    "client_user_agent",
    "fbc",
    "fbp",
    "lead_id",
    "subscription_id",
    "fb_login_id",
    "madid",
    "anon_id",
    "ctwa_clid",
    "page_id",
)
# Warehouse column for each hashed key (INTERFACES.md: email_sha256, phone_sha256, fn_sha256, ...).
SHA256_COLUMN = {
    "em": "email_sha256",
    "ph": "phone_sha256",
    "fn": "fn_sha256",
    "ln": "ln_sha256",
    **{k: f"{k}_sha256" for k in ("ge", "db", "ct", "st", "zp", "country", "external_id")},
}
FULL_NAME = "full_name"  # pseudo-key for hash_identity_columns: split into fn + ln
CAPI_MAX_EVENTS = 1000
MAX_EVENT_AGE = timedelta(days=7)
ACTION_SOURCE = "system_generated"

# Python's str.strip()/str.split() whitespace restricted to ASCII; used so that polars (Rust)
# expressions and Python agree exactly on ASCII input.
_ASCII_WS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_WS = r"[ \t\n\r\x0b\x0c\x1c-\x1f]"
_NWS = r"[^ \t\n\r\x0b\x0c\x1c-\x1f]"
_ASCII_PUNCT_SYMBOLS = r"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~"""  # ASCII categories P* and S*

# ASCII plus Latin letters and combining accents (U+00C0-024F but U+00D7, U+00F7; U+0300-036F;
# U+1E00-1EFF): no whitespace, punctuation or symbols, and case mappings that Python and polars
# agree on char by char; such text may take the polars expressions. Anything else goes scalar.
_SIMPLE_TEXT = (
    r"^[\x00-\x7F\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{24F}\x{300}-\x{36F}\x{1E00}-\x{1EFF}]*$"
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_EMAIL_PL = rf"^[^@{_WS[1:-1]}]+@[^@{_WS[1:-1]}]+\.[^@{_WS[1:-1]}]+$"
_INTL_MARK = re.compile(r"[^0-9]*\+")
_NON_DIGIT = re.compile(r"[^0-9]")
_LEAD_ID = re.compile(r"[1-9][0-9]{14,15}")
_ANY_WS = re.compile(r"\s")
_CURRENCY = re.compile(r"[A-Z]{3}")

_GENDERS = {"m": "m", "male": "m", "man": "m", "f": "f", "female": "f", "woman": "f"}
# ISO 3166-1 "exceptionally reserved" code people write for GB; pycountry does not list it.
_COUNTRY_ALIASES = {"uk": "gb"}


# ---------------------------------------------------------------------------------------------
# Country context (phone calling code, trunk prefix, state names) from phonenumbers + pycountry


@dataclass(frozen=True)
class _Region:
    code: str  # ISO alpha-2, lowercase
    calling_code: str | None  # "1" for us; None when phonenumbers has no metadata
    trunk_prefix: str | None  # national (trunk) prefix as plain digits, e.g. "0" in gb
    lengths: frozenset[int]  # possible national-number lengths
    state_codes: Mapping[str, str]  # letters-only subdivision name -> 2-letter code


@functools.lru_cache(maxsize=64)
def _region(default_country: str) -> _Region:
    code = str(default_country).strip().lower()
    if pycountry.countries.get(alpha_2=code.upper()) is None:
        raise ValueError(f"default_country must be an ISO 3166-1 alpha-2 code, got {code!r}")
    meta = PhoneMetadata.metadata_for_region(code.upper())
    calling, trunk, lengths = None, None, frozenset()
    if meta is not None:
        calling = str(meta.country_code)
        prefix = meta.national_prefix
        trunk = prefix if prefix and prefix.isdigit() else None
        lengths = frozenset(meta.general_desc.possible_length or ())
    states: dict[str, str] = {}
    for sub in pycountry.subdivisions.get(country_code=code.upper()) or ():
        suffix = sub.code.split("-", 1)[1].lower()
        if len(suffix) == 2 and suffix.isalpha():
            states[_letters(sub.name.lower())] = suffix
    return _Region(code, calling, trunk, lengths, states)


# ---------------------------------------------------------------------------------------------
# Scalar normalization, one function per key. Input `t` is the value trimmed and lowercased.


def _letters(text: str) -> str:
    """Keep letters (and combining marks, so decomposed accents survive)."""
    return "".join(c for c in text if unicodedata.category(c)[0] in "LM")


def _norm_email(t: str, region: _Region) -> str | None:
    return t if _EMAIL.fullmatch(t) else None


def _norm_name(t: str, region: _Region) -> str | None:
    return "".join(c for c in t if unicodedata.category(c)[0] not in "PS").strip() or None


def _norm_city(t: str, region: _Region) -> str | None:
    return _letters(t) or None


def _norm_state(t: str, region: _Region) -> str | None:
    letters = _letters(t)
    if len(letters) == 2:
        return letters
    return region.state_codes.get(letters, letters) or None


def _norm_zip(t: str, region: _Region) -> str | None:
    z = _ANY_WS.sub("", t).split("-", 1)[0]
    if region.code == "us" and z.isascii() and z.isdigit() and len(z) > 5:
        z = z[:5]  # docs: US ZIP codes use only the first 5 digits
    return z or None


@functools.lru_cache(maxsize=4096)
def _country_code(trimmed: str) -> str | None:
    letters = re.sub(r"[^a-z]", "", trimmed.lower())
    if len(letters) == 2:
        letters = _COUNTRY_ALIASES.get(letters, letters)
        return letters if pycountry.countries.get(alpha_2=letters.upper()) else None
    if len(letters) == 3 and (c := pycountry.countries.get(alpha_3=letters.upper())):
        return c.alpha_2.lower()
    try:
        return pycountry.countries.lookup(trimmed).alpha_2.lower()
    except LookupError:
        return None


def _norm_country(t: str, region: _Region) -> str | None:
    return _country_code(t)


def _norm_gender(t: str, region: _Region) -> str | None:
    return _GENDERS.get(_letters(t))


_DATE_PARTS = re.compile(r"(\d{1,4})[-/. ](\d{1,2})[-/. ](\d{1,4})")
_MONTH_FORMATS = ("%B %d %Y", "%b %d %Y", "%d %B %Y", "%d %b %Y", "%Y %B %d", "%Y %b %d")


def _ymd(y: int, m: int, d: int) -> str | None:
    try:
        return date(y, m, d).strftime("%Y%m%d") if 1800 <= y <= 2200 else None
    except ValueError:
        return None


def _norm_date(t: str, region: _Region) -> str | None:
    """YYYYMMDD from ISO, compact, numeric (US month-first, elsewhere day-first) or month names.

    Two-digit years are ambiguous and dropped.
    """
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}[t ].*", t):
        t = t[:10]
    if re.fullmatch(r"\d{8}", t):
        return _ymd(int(t[:4]), int(t[4:6]), int(t[6:]))
    if m := _DATE_PARTS.fullmatch(t):
        a, b, c = m.groups()
        if len(a) == 4 and len(c) <= 2:
            return _ymd(int(a), int(b), int(c))
        if len(c) == 4 and len(a) <= 2:
            first, second = int(a), int(b)
            month, day = (first, second) if region.code == "us" else (second, first)
            if month > 12 >= day:
                month, day = day, month
            return _ymd(int(c), month, day)
        return None
    spaced = " ".join(re.sub(r"[,.\-/]", " ", t).split())
    for fmt in _MONTH_FORMATS:
        try:
            parsed = datetime.strptime(spaced, fmt)
        except ValueError:
            continue
        return _ymd(parsed.year, parsed.month, parsed.day)
    return None


def _norm_external_id(t: str, region: _Region) -> str | None:
    return t


def _phone_fast(digits: str, intl: bool, region: _Region) -> str | None:
    """E.164 digits by the fast rules, or None when they cannot place the number."""
    if intl:
        return digits.lstrip("0")
    cc, trunk, lengths = region.calling_code, region.trunk_prefix, region.lengths
    if cc is None:
        return None
    if trunk and digits.startswith(trunk):
        # national number after the trunk prefix; anything odd (e.g. "8 0152..." in by, whose
        # trunk prefixes are "8" and "80") is left to phonenumbers
        rest = digits[len(trunk) :]
        return cc + rest if len(rest) in lengths and not rest.startswith("0") else None
    if len(digits) in lengths:
        return cc + digits
    if digits.startswith(cc) and len(digits) - len(cc) in lengths:
        return digits
    return None


@functools.lru_cache(maxsize=65536)
def _phone_slow(digits: str, region_code: str) -> str | None:
    """phonenumbers' own parse for what the fast rules cannot place (IDD prefixes, odd lengths)."""
    possible = phonenumbers.ValidationResult.IS_POSSIBLE
    attempts = [(digits, region_code.upper())]
    if not digits.startswith("0"):  # a calling code written without '+' never starts with 0
        attempts.append(("+" + digits, None))
    for text, reg in attempts:
        try:
            number = phonenumbers.parse(text, reg)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number_with_reason(number) == possible:
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)[1:]
    return None


def _valid_phone(n: str | None) -> str | None:
    return n if n and 7 <= len(n) <= 15 and not n.startswith("0") else None


def _norm_phone(t: str, region: _Region) -> str | None:
    """Digits with the country calling code (E.164 without '+').

    International when a '+' comes before the first digit or the digits start with 00:
    leading zeros go. Otherwise the default country's trunk prefix is removed and its calling
    code prepended when the length fits phonenumbers' possible lengths, a number that already
    starts with the calling code is kept, and phonenumbers.parse decides the rest.
    """
    digits = _NON_DIGIT.sub("", t)
    if not digits:
        return None
    intl = bool(_INTL_MARK.match(t)) or digits.startswith("00")
    n = _phone_fast(digits, intl, region)
    if n is None and not intl:
        n = _phone_slow(digits, region.code)
    return _valid_phone(n)


_NORMALIZERS: dict[str, Callable[[str, _Region], str | None]] = {
    "em": _norm_email,
    "ph": _norm_phone,
    "fn": _norm_name,
    "ln": _norm_name,
    "ge": _norm_gender,
    "db": _norm_date,
    "ct": _norm_city,
    "st": _norm_state,
    "zp": _norm_zip,
    "country": _norm_country,
    "external_id": _norm_external_id,
}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hash_one(key: str, value: str, region: _Region) -> str | None:
    """Normalized SHA-256 hex of one value, the value itself if already hashed, None if invalid."""
    t = value.strip().lower()
    if not t:
        return None
    if _HEX64.fullmatch(t):
        return t
    normalized = _NORMALIZERS[key](t, region)
    return _sha256(normalized) if normalized else None


def _values(key: str, raw: object) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list | tuple) and all(isinstance(v, str) or v is None for v in raw):
        return [v for v in raw if v is not None]
    raise ValueError(
        f"user_data[{key!r}] must be a string or a list of strings, got {type(raw).__name__}"
    )


def normalize_user_data(raw: Mapping[str, str | list[str]], *, default_country: str = "us") -> dict:
    """The ``user_data`` object exactly as sent to Meta (CONTRACTS.md section 1).

    Hashed keys (``em ph fn ln ge db ct st zp country external_id``) accept a string or a list of
    strings and come out as a list of SHA-256 hex digests, deduplicated in input order; values
    that cannot be normalized (e.g. an email without ``x@y.z`` shape) are dropped, and a key left
    without values is omitted. A value that already is a 64-hex digest is passed through.
    Pass-through keys (``client_ip_address client_user_agent fbc fbp lead_id`` and Meta's other
    unhashed ids) take one string, are trimmed and never hashed; ``lead_id`` must be 15-16 digits
    and is sent as an integer. ``default_country`` (ISO alpha-2) supplies the phone calling code,
    the state-name table and the US ZIP rule.

    Raises ValueError naming the key for an unknown key or a value of the wrong type.
    """
    region = _region(default_country)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _NORMALIZERS:
            hashes: list[str] = []
            for v in _values(key, value):
                h = _hash_one(key, v, region)
                if h is not None and h not in hashes:
                    hashes.append(h)
            if hashes:
                out[key] = hashes
        elif key in PASS_THROUGH_KEYS:
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(
                    f"user_data[{key!r}] must be a single string, got {type(value).__name__}"
                )
            text = value.strip()
            if key == "lead_id":
                if _LEAD_ID.fullmatch(text):
                    out[key] = int(text)
            elif text:
                out[key] = text
        else:
            raise ValueError(
                f"user_data key {key!r} is not a Conversions API customer information key"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Vectorized hashing of whole frames


def _is_hex64(expr: pl.Expr) -> pl.Expr:
    """A lowercase 64-hex digest."""
    return expr.str.contains("^[0-9a-f]{64}$")


def _sha256_each(values: pl.Series) -> pl.Series:
    sha = hashlib.sha256
    digests = [None if v is None else sha(v).digest() for v in values.cast(pl.Binary).to_list()]
    return pl.Series(values.name, digests, dtype=pl.Binary).bin.encode("hex")


def sha256_hex_series(values: pl.Series) -> pl.Series:
    """Lowercase SHA-256 hex of each string's UTF-8 bytes; nulls stay null.

    Repeated values (names, cities) are hashed once: one hashlib call per distinct value.
    """
    values = values.cast(pl.String)
    distinct = values.drop_nulls().unique()
    if len(distinct) * 2 > len(values):
        return _sha256_each(values)
    mapping = dict(zip(distinct.to_list(), _sha256_each(distinct).to_list(), strict=True))
    return values.replace_strict(mapping, default=None, return_dtype=pl.String)


def _lookup(s: pl.Series, mask: pl.Series, fn: Callable[[str], str | None]) -> pl.Series:
    """fn applied once per distinct value of s where mask holds (null elsewhere)."""
    distinct = s.filter(mask).drop_nulls().unique().to_list()
    if not distinct:
        return pl.Series(s.name, [None] * len(s), dtype=pl.String)
    mapping = {v: fn(v) for v in distinct}
    mapped = s.replace_strict(mapping, default=None, return_dtype=pl.String)
    return pl.select(pl.when(mask).then(mapped)).to_series().alias(s.name)


def _ascii_phone(frame: pl.DataFrame, region: _Region) -> pl.DataFrame:
    """Adds ``normalized`` (E.164 digits by the fast rules) and ``needs_scalar`` from ``t``."""
    t, digits = pl.col("t"), pl.col("digits")
    frame = frame.with_columns(digits=t.str.replace_all(r"[^0-9]", ""))
    frame = frame.with_columns(
        intl=t.str.contains(r"^[^0-9]*\+") | digits.str.starts_with("00"),
        n_len=digits.str.len_chars().cast(pl.Int64),
    )
    n_len = pl.col("n_len")
    cc, trunk, lengths = region.calling_code, region.trunk_prefix, sorted(region.lengths)
    fast: Any = pl.when(pl.col("intl")).then(digits.str.strip_chars_start("0"))
    if cc is not None:
        if trunk:
            rest = digits.str.slice(len(trunk))
            fast = (
                fast.when(
                    digits.str.starts_with(trunk)
                    & (n_len - len(trunk)).is_in(lengths)
                    & ~rest.str.starts_with("0")
                )
                .then(pl.lit(cc) + rest)
                .when(digits.str.starts_with(trunk))
                .then(pl.lit(None, dtype=pl.String))
            )
        fast = fast.when(n_len.is_in(lengths)).then(pl.lit(cc) + digits)
        fast = fast.when(digits.str.starts_with(cc) & (n_len - len(cc)).is_in(lengths)).then(digits)
    frame = frame.with_columns(fast=fast.otherwise(None))
    fast = pl.col("fast")
    valid = fast.str.len_chars().is_between(7, 15) & ~fast.str.starts_with("0")
    return frame.with_columns(
        normalized=pl.when(valid).then(fast),
        needs_scalar=fast.is_null() & ~pl.col("intl") & (n_len > 0),
    )


def _ascii_normalized(frame: pl.DataFrame, key: str, region: _Region) -> pl.DataFrame:
    """Polars twin of _NORMALIZERS[key] on _SIMPLE_TEXT: adds ``normalized``, ``needs_scalar``."""
    t = pl.col("t")
    if key == "ph":
        return _ascii_phone(frame, region)
    if key == "em":
        normalized = pl.when(t.str.contains(_EMAIL_PL)).then(t)
    elif key in ("fn", "ln"):
        cleaned = t.str.replace_all(f"[{re.escape(_ASCII_PUNCT_SYMBOLS)}]", "")
        cleaned = cleaned.str.strip_chars(_ASCII_WS)
        normalized = pl.when(cleaned != "").then(cleaned)
    elif key == "external_id":
        normalized = t
    else:
        raise KeyError(key)
    return frame.with_columns(normalized=normalized, needs_scalar=pl.lit(False))


_VECTOR_KEYS = ("em", "ph", "fn", "ln", "external_id")


def _hash_series(s: pl.Series, key: str, region: _Region) -> pl.Series:
    """Vectorized _hash_one over a string column (null in, null out)."""
    name = SHA256_COLUMN[key]
    s = s.rename("raw")
    scalar = functools.partial(_hash_one, key, region=region)
    if key not in _VECTOR_KEYS:  # low-cardinality keys: once per distinct value
        return _lookup(s, s.is_not_null(), scalar).alias(name)
    raw = pl.col("raw")
    # intermediate columns are materialized step by step: a nested expression tree would
    # re-evaluate the shared regex steps for every branch that uses them
    frame = pl.DataFrame({"raw": s}).with_columns(
        is_simple=raw.str.contains(_SIMPLE_TEXT),
        t=raw.str.strip_chars(_ASCII_WS).str.to_lowercase(),
    )
    frame = frame.with_columns(hexed=_is_hex64(pl.col("t")))
    frame = _ascii_normalized(frame, key, region)
    needs = (~frame["is_simple"] | frame["needs_scalar"]).fill_null(False)
    via_scalar = _lookup(s, needs, scalar)
    to_hash = frame.select(
        pl.when(~needs & ~pl.col("hexed") & (pl.col("t") != "")).then(pl.col("normalized"))
    ).to_series()
    hashed = sha256_hex_series(to_hash)
    return frame.select(
        pl.when(needs)
        .then(via_scalar)
        .when(pl.col("hexed"))
        .then(pl.col("t"))
        .otherwise(hashed)
        .alias(name)
    ).to_series()


def split_full_name(full_name: str | None) -> tuple[str | None, str | None]:
    """(first, last) of a full name: "Last, First ..." or "First ... Last"; middle names drop."""
    if full_name is None:
        return None, None
    name = full_name.strip()
    if "," in name:
        last, _, rest = name.partition(",")
        tokens = rest.split()
        return (tokens[0] if tokens else None), (last.strip() or None)
    tokens = name.split()
    if not tokens:
        return None, None
    return tokens[0], (tokens[-1] if len(tokens) > 1 else None)


def _split_full_name_series(s: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Vectorized split_full_name (simple text in polars, the rest once per distinct value)."""
    raw = pl.col("raw")
    comma = raw.str.contains(",")
    frame = pl.DataFrame({"raw": s.cast(pl.String)})
    parts = frame.select(
        is_simple=raw.str.contains(_SIMPLE_TEXT),
        first=pl.when(comma)
        .then(raw.str.extract(rf"^[^,]*,{_WS}*({_NWS}+)", 1))
        .otherwise(raw.str.extract(rf"^{_WS}*({_NWS}+)", 1)),
        last=pl.when(comma)
        .then(raw.str.extract(r"^([^,]*),", 1).str.strip_chars(_ASCII_WS))
        .when(raw.str.contains(rf"{_NWS}{_WS}+{_NWS}"))
        .then(raw.str.extract(rf"({_NWS}+){_WS}*$", 1))
        .otherwise(None),
    ).with_columns(last=pl.when(pl.col("last") != "").then(pl.col("last")))
    other = ~parts["is_simple"].fill_null(True)
    scalar_first = _lookup(frame["raw"], other, lambda v: split_full_name(v)[0])
    scalar_last = _lookup(frame["raw"], other, lambda v: split_full_name(v)[1])
    first = pl.select(pl.when(other).then(scalar_first).otherwise(parts["first"])).to_series()
    last = pl.select(pl.when(other).then(scalar_last).otherwise(parts["last"])).to_series()
    return first, last


_STRING_DTYPES = (pl.String, pl.Categorical, pl.Enum, pl.Null)


def hash_identity_columns(
    df: pl.DataFrame,
    columns: Mapping[str, str],
    *,
    default_country: str = "us",
    drop_raw: bool = True,
) -> pl.DataFrame:
    """Hash raw PII columns into ``<key>_sha256`` columns, bit-identical to normalize_user_data.

    ``columns`` maps a raw column to a hashed key (``em ph fn ln ge db ct st zp country
    external_id``) or to ``"full_name"`` (split into ``fn``/``ln`` by ``split_full_name``).
    Output names follow the warehouse: ``em`` -> ``email_sha256``, ``ph`` -> ``phone_sha256``,
    ``fn`` -> ``fn_sha256``, ``ln`` -> ``ln_sha256``, other keys ``<key>_sha256``; a value that
    normalizes to nothing is null. The raw columns are dropped unless ``drop_raw=False``.
    """
    region = _region(default_country)
    outputs: dict[str, pl.Series] = {}

    def put(name: str, series: pl.Series) -> None:
        if name in outputs:
            raise ValueError(f"two input columns map to the output column {name!r}")
        outputs[name] = series.alias(name)

    for column, key in columns.items():
        if column not in df.columns:
            raise ValueError(f"column {column!r} is not in the frame")
        if not isinstance(df.schema[column], _STRING_DTYPES):
            raise ValueError(f"column {column!r} must hold strings, got {df.schema[column]}")
        values = df[column].cast(pl.String)
        if key == FULL_NAME:
            first, last = _split_full_name_series(values)
            put(SHA256_COLUMN["fn"], _hash_series(first, "fn", region))
            put(SHA256_COLUMN["ln"], _hash_series(last, "ln", region))
        elif key in _NORMALIZERS:
            put(SHA256_COLUMN[key], _hash_series(values, key, region))
        else:
            raise ValueError(f"column {column!r}: {key!r} is not a hashed user_data key")
    base = df.drop(list(columns)) if drop_raw else df
    return base.with_columns(list(outputs.values()))


LEAD_IDENTITY_COLUMNS = ("lead_id", "email_sha256", "phone_sha256", "fn_sha256", "ln_sha256")


def lead_identity(field_data: Iterable[Mapping[str, Any]] | None) -> dict[str, str | None]:
    """Raw email / phone / first / last name from a lead's ``field_data`` (raw PII: hash it)."""
    fields: dict[str, str] = {}
    for item in field_data or ():
        values = item.get("values") or []
        if item.get("name") and values and isinstance(values[0], str):
            fields.setdefault(str(item["name"]).lower(), values[0])
    first, last = fields.get("first_name"), fields.get("last_name")
    if first is None and last is None:
        first, last = split_full_name(fields.get("full_name"))
    return {
        "email": fields.get("email"),
        "phone": fields.get("phone_number") or fields.get("phone"),
        "first_name": first,
        "last_name": last,
    }


def hash_lead_field_data(
    leads: Iterable[Mapping[str, Any]], *, default_country: str = "us"
) -> pl.DataFrame:
    """Graph API lead records -> lead_id, email_sha256, phone_sha256, fn_sha256, ln_sha256.

    Reads ``field_data`` names ``email``, ``phone_number``, ``first_name``/``last_name`` or else
    ``full_name`` (split first/last). No raw value leaves this function.
    """
    rows = [{"lead_id": str(lead["id"]), **lead_identity(lead.get("field_data"))} for lead in leads]
    schema = {"lead_id": pl.String, "email": pl.String, "phone": pl.String}
    schema |= {"first_name": pl.String, "last_name": pl.String}
    frame = pl.DataFrame(rows, schema=schema)
    columns = {"email": "em", "phone": "ph", "first_name": "fn", "last_name": "ln"}
    hashed = hash_identity_columns(frame, columns, default_country=default_country)
    return hashed.select(LEAD_IDENTITY_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Click ids and event ids

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _as_utc(moment: datetime) -> datetime:
    if not isinstance(moment, datetime):
        raise ValueError(f"expected a datetime, got {type(moment).__name__}")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def fbc_from_fbclid(
    fbclid: str | None, creation_time_ms: int | datetime, subdomain_index: int = 1
) -> str | None:
    """``fb.{subdomain_index}.{creation_time_ms}.{fbclid}`` (fbclid case kept); None if no fbclid.

    ``creation_time_ms`` is when the click id was first seen: epoch milliseconds or a datetime
    (naive = UTC).
    """
    if fbclid is None or not fbclid.strip(_ASCII_WS):
        return None
    if isinstance(creation_time_ms, datetime):
        creation_time_ms = (_as_utc(creation_time_ms) - _EPOCH) // timedelta(milliseconds=1)
    return f"fb.{int(subdomain_index)}.{int(creation_time_ms)}.{fbclid.strip(_ASCII_WS)}"


def fbc_expr(fbclid: str | pl.Expr, created_at: str | pl.Expr, subdomain_index: int = 1) -> pl.Expr:
    """Vectorized fbc_from_fbclid: ``created_at`` is a Datetime column (naive = UTC)."""
    fbclid = pl.col(fbclid) if isinstance(fbclid, str) else fbclid
    created_at = pl.col(created_at) if isinstance(created_at, str) else created_at
    clean = fbclid.str.strip_chars(_ASCII_WS)
    fbc = pl.concat_str(
        [pl.lit(f"fb.{int(subdomain_index)}."), created_at.dt.epoch("ms").cast(pl.String)]
        + [pl.lit("."), clean]
    )
    return pl.when(clean != "").then(fbc)


def _event_key(deal_id: str, to_stage: str, occurred_us: int) -> str:
    return "\x1f".join((str(deal_id), str(to_stage), str(occurred_us)))


def event_id(deal_id: str, from_stage: str | None, to_stage: str, occurred_at: datetime) -> str:
    """Deterministic 32-hex id of one stage change: same deal + same change -> same id, any run.

    SHA-256 of ``deal_id, to_stage, occurred_at in epoch us``: a change is the deal ENTERING a
    stage at a moment. ``from_stage`` is accepted but not hashed: a late-arriving earlier state
    changes what the change came from, never which change it is (one CAPI event per entry).
    """
    occurred_us = (_as_utc(occurred_at) - _EPOCH) // timedelta(microseconds=1)
    return _sha256(_event_key(deal_id, to_stage, occurred_us))[:32]


def event_id_expr_frame(df: pl.DataFrame) -> pl.Series:
    """Vectorized event_id over a frame with deal_id, to_stage, occurred_at (from_stage unused)."""
    key = df.select(
        pl.concat_str(
            [
                pl.col("deal_id").cast(pl.String),
                pl.col("to_stage").cast(pl.String),
                pl.col("occurred_at").dt.epoch("us").cast(pl.String),
            ],
            separator="\x1f",
        )
    ).to_series()
    return sha256_hex_series(key).str.slice(0, 32).alias("event_id")


# ---------------------------------------------------------------------------------------------
# CRM stage changes -> Conversion Leads events

STAGE_CHANGE_COLUMNS: dict[str, pl.DataType] = {
    "deal_id": pl.String(),  # required
    "from_stage": pl.String(),  # null for the deal's creation
    "to_stage": pl.String(),  # required
    "stage_name": pl.String(),  # to_stage's label: the CRM event_name
    "occurred_at": pl.Datetime("us", "UTC"),  # required; naive = UTC
    "value": pl.Float64(),  # custom_data.value (synthetic revenue); null/negative: not sent
    "currency": pl.String(),  # ISO 4217 per row; null -> the `currency` argument
    "email_sha256": pl.String(),
    "phone_sha256": pl.String(),
    "fn_sha256": pl.String(),
    "ln_sha256": pl.String(),
    "fbclid": pl.String(),  # turned into fbc with contact_created_at when fbc is null
    "fbc": pl.String(),
    "lead_id": pl.String(),  # Meta lead id, 15-16 digits
    "contact_created_at": pl.Datetime("us", "UTC"),  # lead creation: event_time must follow it
    "is_won": pl.Boolean(),  # closed-won -> "Purchase"; default: stage_name is "closed won"
}
_REQUIRED = ("deal_id", "to_stage", "occurred_at")

EVENTS_SCHEMA = {
    "event_id": pl.String,
    "deal_id": pl.String,
    "from_stage": pl.String,
    "to_stage": pl.String,
    "event_name": pl.String,
    "event_time": pl.Int64,
    "value": pl.Float64,
    "currency": pl.String,
    "time_clamped": pl.Boolean,
    "payload": pl.String,
}
REJECTED_SCHEMA = {
    "event_id": pl.String,
    "deal_id": pl.String,
    "from_stage": pl.String,
    "to_stage": pl.String,
    "event_name": pl.String,
    "occurred_at": pl.Datetime("us", "UTC"),
    "event_time": pl.Int64,
    "reason": pl.String,
}
# Rejection reasons, in the order they are tested (the first that applies is reported).
REASONS = (
    "incomplete_stage_change",  # null deal_id, to_stage or occurred_at
    "missing_event_name",
    "unhashed_identifier",
    "no_user_data",
    "invalid_currency",
    "purchase_without_value",
    "too_old",
    "in_future",
)


def _json_string(expr: pl.Expr) -> pl.Expr:
    """JSON string literal of each value (null stays null)."""
    encoded = pl.struct(expr.alias("v")).struct.json_encode()
    return pl.when(expr.is_not_null()).then(encoded.str.slice(5).str.strip_suffix("}"))


def _json_field(name: str, value_json: pl.Expr) -> pl.Expr:
    return pl.concat_str([pl.lit(f'"{name}":'), value_json])  # null value -> null field


def build_events(
    stage_changes: pl.DataFrame,
    *,
    now: datetime,
    currency: str,
    lead_event_source: str = "HubSpot",
    max_age: timedelta = MAX_EVENT_AGE,
    fbc_subdomain_index: int = 1,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """CRM stage changes -> (Conversion Leads events to send, changes not sent with a reason).

    Input columns are ``STAGE_CHANGE_COLUMNS`` (only deal_id, to_stage, occurred_at required;
    stage_name too unless the change is a win). Each event: ``event_name`` = the stage's name
    (``Purchase`` for closed-won), ``event_time`` = occurred_at in integer seconds, moved to one
    second after ``contact_created_at`` when it is not later (``time_clamped``),
    ``action_source=system_generated``, ``custom_data`` with ``event_source="crm"``,
    ``lead_event_source``, and ``value``/``currency`` when value is known and not negative;
    ``user_data`` with em/ph/fn/ln (lists of the given digests), fbc and lead_id (integer) when
    known. Duplicate stage changes (same event_id) are sent once.

    Not sent (second frame, ``reason`` from ``REASONS``): older than ``max_age`` before ``now``
    (Meta rejects the whole request for one such event), later than ``now``, no user_data,
    a ``*_sha256`` value that is not a 64-hex digest, an invalid currency, a Purchase without
    value.
    """
    currency_default = str(currency).strip().upper()
    if not _CURRENCY.fullmatch(currency_default):
        raise ValueError("currency must be a 3-letter ISO 4217 code")
    missing = [c for c in _REQUIRED if c not in stage_changes.columns]
    if missing:
        raise ValueError(f"stage_changes lacks required columns {missing}")
    df = stage_changes.with_columns(
        [
            pl.lit(None, dtype=t).alias(c)
            for c, t in STAGE_CHANGE_COLUMNS.items()
            if c not in stage_changes.columns
        ]
    )
    for column in ("occurred_at", "contact_created_at"):
        dtype = df.schema[column]
        if isinstance(dtype, pl.Datetime):
            if dtype.time_zone is None:
                df = df.with_columns(pl.col(column).dt.replace_time_zone("UTC"))
        elif not isinstance(dtype, pl.Null):
            raise ValueError(f"column {column!r} must be a Datetime, got {dtype}")
    df = df.with_columns(
        pl.col(c).cast(pl.String)
        for c in STAGE_CHANGE_COLUMNS
        if STAGE_CHANGE_COLUMNS[c] == pl.String()
    ).with_columns(
        pl.col("occurred_at").cast(pl.Datetime("us", "UTC")),
        pl.col("contact_created_at").cast(pl.Datetime("us", "UTC")),
        pl.col("value").cast(pl.Float64),
        pl.col("is_won").cast(pl.Boolean),
    )
    df = df.with_columns(event_id_expr_frame(df))
    df = df.filter(pl.col("event_id").is_null() | pl.col("event_id").is_first_distinct())

    now_s = (_as_utc(now) - _EPOCH) // timedelta(seconds=1)
    max_age_s = int(max_age.total_seconds())
    occurred_s = pl.col("occurred_at").dt.epoch("s")
    created_s = pl.col("contact_created_at").dt.epoch("s")
    hex_ok = {
        c: pl.col(c).is_null() | _is_hex64(pl.col(c))
        for c in ("email_sha256", "phone_sha256", "fn_sha256", "ln_sha256")
    }
    won = (
        pl.col("is_won")
        .fill_null(
            pl.col("stage_name").str.to_lowercase().str.replace_all(r"[^a-z]", "") == "closedwon"
        )
        .fill_null(False)
    )
    lead_id = pl.col("lead_id").str.strip_chars(_ASCII_WS)
    value_ok = pl.col("value").is_not_null() & pl.col("value").is_finite() & (pl.col("value") >= 0)
    df = df.with_columns(
        event_name=pl.when(won).then(pl.lit("Purchase")).otherwise(pl.col("stage_name")),
        is_won=won,
        time_clamped=created_s.is_not_null() & (occurred_s <= created_s),
        event_time=pl.when(created_s.is_not_null() & (occurred_s <= created_s))
        .then(created_s + 1)
        .otherwise(occurred_s),
        fbc=pl.coalesce(
            pl.when(pl.col("fbc").str.strip_chars(_ASCII_WS) != "").then(
                pl.col("fbc").str.strip_chars(_ASCII_WS)
            ),
            fbc_expr("fbclid", "contact_created_at", fbc_subdomain_index),
        ),
        lead_id=pl.when(lead_id.str.contains(r"^[1-9][0-9]{14,15}$")).then(lead_id),
        currency=pl.coalesce(
            pl.col("currency").str.strip_chars(_ASCII_WS).str.to_uppercase(),
            pl.lit(currency_default),
        ),
        value=pl.when(value_ok).then(pl.col("value")),
    )
    has_user = pl.any_horizontal(
        pl.col(c).is_not_null()
        for c in ("email_sha256", "phone_sha256", "fn_sha256", "ln_sha256", "fbc", "lead_id")
    )
    reason = (
        pl.when(pl.col("event_id").is_null())
        .then(pl.lit("incomplete_stage_change"))
        .when(pl.col("event_name").is_null() | (pl.col("event_name").str.strip_chars() == ""))
        .then(pl.lit("missing_event_name"))
        .when(~pl.all_horizontal(hex_ok.values()))
        .then(pl.lit("unhashed_identifier"))
        .when(~has_user)
        .then(pl.lit("no_user_data"))
        .when(pl.col("value").is_not_null() & ~pl.col("currency").str.contains("^[A-Z]{3}$"))
        .then(pl.lit("invalid_currency"))
        .when(pl.col("is_won") & pl.col("value").is_null())
        .then(pl.lit("purchase_without_value"))
        .when(pl.col("event_time") < now_s - max_age_s)
        .then(pl.lit("too_old"))
        .when(pl.col("event_time") > now_s)
        .then(pl.lit("in_future"))
        .otherwise(None)
    )
    df = df.with_columns(reason=reason)
    rejected = df.filter(pl.col("reason").is_not_null()).select(
        [pl.col(c).cast(t) for c, t in REJECTED_SCHEMA.items()]
    )
    good = df.filter(pl.col("reason").is_null())

    def hashed_list(column: str, key: str) -> pl.Expr:
        return _json_field(key, pl.concat_str([pl.lit('["'), pl.col(column), pl.lit('"]')]))

    # JSON pieces are materialized one step at a time (one large nested expression is slower)
    good = good.with_columns(
        currency=pl.when(pl.col("value").is_not_null()).then(pl.col("currency")),
        name_json=_json_string(pl.col("event_name")),
        fbc_json=_json_string(pl.col("fbc")),
    )
    good = good.with_columns(
        user_json=pl.concat_str(
            [
                hashed_list("email_sha256", "em"),
                hashed_list("phone_sha256", "ph"),
                hashed_list("fn_sha256", "fn"),
                hashed_list("ln_sha256", "ln"),
                _json_field("fbc", pl.col("fbc_json")),
                _json_field("lead_id", pl.col("lead_id")),
            ],
            separator=",",
            ignore_nulls=True,
        ),
        custom_json=pl.concat_str(
            [
                pl.lit(f'"event_source":"crm","lead_event_source":{json.dumps(lead_event_source)}'),
                _json_field("value", pl.col("value").cast(pl.String)),
                _json_field("currency", pl.concat_str([pl.lit('"'), "currency", pl.lit('"')])),
            ],
            separator=",",
            ignore_nulls=True,
        ),
    )
    payload = pl.concat_str(
        [
            pl.lit('{"event_name":'),
            pl.col("name_json"),
            pl.lit(',"event_time":'),
            pl.col("event_time").cast(pl.String),
            pl.lit(',"event_id":"'),
            pl.col("event_id"),
            pl.lit(f'","action_source":"{ACTION_SOURCE}","user_data":{{'),
            pl.col("user_json"),
            pl.lit('},"custom_data":{'),
            pl.col("custom_json"),
            pl.lit("}}"),
        ]
    )
    events = good.with_columns(payload=payload).select(
        [pl.col(c).cast(t) for c, t in EVENTS_SCHEMA.items()]
    )
    return events, rejected


def to_payload_dicts(events: pl.DataFrame) -> list[dict]:
    """The event dicts to POST, from build_events' ``payload`` column."""
    return [json.loads(p) for p in events["payload"].to_list()]


# ---------------------------------------------------------------------------------------------
# Upload planning (the HTTP call is injected)

T = TypeVar("T")


def chunk(events: Sequence[T] | pl.DataFrame, size: int = CAPI_MAX_EVENTS) -> list:
    """Consecutive batches of at most ``size`` (<= 1,000, Meta's limit) events or frame rows."""
    if not 1 <= size <= CAPI_MAX_EVENTS:
        raise ValueError(f"batch size must be between 1 and {CAPI_MAX_EVENTS}, got {size}")
    if isinstance(events, pl.DataFrame):
        return [events.slice(i, size) for i in range(0, events.height, size)]
    return [list(events[i : i + size]) for i in range(0, len(events), size)]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class UploadInterrupted(RuntimeError):
    """A non-rejection error (throttling, 5xx after retries) stopped isolate_bad_events midway.

    Carries what is already known so the caller's ledger never re-sends accepted events:
    ``accepted``, ``rejected`` and ``unsent`` (in input order); the cause is ``__cause__``.
    """

    def __init__(
        self, accepted: list[dict], rejected: list[tuple[dict, str]], unsent: list[dict]
    ) -> None:
        super().__init__(
            f"upload interrupted: {len(accepted)} accepted, {len(rejected)} rejected, "
            f"{len(unsent)} not sent"
        )
        self.accepted, self.rejected, self.unsent = accepted, rejected, unsent


class _NotARejection(Exception):
    pass


def isolate_bad_events(
    batch: Sequence[dict],
    send: Callable[[list[dict]], dict | Exception],
    *,
    is_rejection: Callable[[BaseException], bool] = lambda exc: True,
) -> tuple[list[dict], list[tuple[dict, str]]]:
    """Send a batch; when Meta rejects it, bisect so every good event still goes.

    ``send`` posts a list of events and returns Meta's answer, or returns/raises an exception
    when the request is rejected (one bad event rejects the whole request). Returns (accepted
    events in input order, [(rejected event, reason)]). One bad event among n costs at most
    1 + 2*ceil(log2 n) calls: a half known to fail is split without being sent again, and when
    the left half goes through the right half is known to fail.

    An exception for which ``is_rejection`` is false (throttling, 5xx after the client's
    retries) stops the bisection: ``UploadInterrupted`` is raised from it, carrying the
    accepted, rejected and unsent events.
    """
    if len(batch) > CAPI_MAX_EVENTS:
        raise ValueError(f"a batch holds at most {CAPI_MAX_EVENTS} events, got {len(batch)}")
    accepted: list[dict] = []
    rejected: list[tuple[dict, str]] = []

    def attempt(events: list[dict]) -> BaseException | None:
        try:
            answer = send(events)
        except Exception as exc:  # the injected sender may signal rejection by raising
            answer = exc
        if isinstance(answer, BaseException):
            if not is_rejection(answer):
                raise _NotARejection() from answer
            return answer
        if isinstance(answer, Mapping) and answer.get("error"):
            return ValueError(str(answer["error"])[:400])
        return None

    def resolve(events: list[dict], failure: BaseException | None) -> None:
        # failure is None: this exact list was not sent yet; else the error it got
        if failure is None:
            failure = attempt(events)
            if failure is None:
                accepted.extend(events)
                return
        if len(events) == 1:
            rejected.append((events[0], _reason(failure)))
            return
        middle = len(events) // 2
        left, right = events[:middle], events[middle:]
        left_failure = attempt(left)
        if left_failure is None:
            accepted.extend(left)
            resolve(right, failure)  # the culprit must be on the right
        else:
            resolve(left, left_failure)
            resolve(right, None)

    try:
        if batch:
            resolve(list(batch), None)
    except _NotARejection as stop:
        done = {id(e) for e in accepted} | {id(e) for e, _ in rejected}
        unsent = [e for e in batch if id(e) not in done]
        raise UploadInterrupted(accepted, rejected, unsent) from stop.__cause__
    return accepted, rejected


_PHONE_RUN = re.compile(r"\+?[0-9][0-9 ().\-]{5,22}[0-9]")
_EMAIL_SEARCH = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# Keys whose string values are ids or machine text, never a raw email/phone.
_SAFE_KEYS = frozenset(
    {"event_id", "fbc", "fbp", "lead_id", "client_ip_address", "client_user_agent", "madid"}
    | {"anon_id", "page_id", "ctwa_clid", "subscription_id", "fb_login_id", "currency"}
)


def _raw_looking(text: str) -> str | None:
    if _EMAIL_SEARCH.search(text):
        return "looks like a raw email"
    for run in _PHONE_RUN.findall(text):
        if 7 <= len(_NON_DIGIT.sub("", run)) <= 15:
            return "looks like a raw phone number"
    return None


def contains_unhashed_identifier(payload: Any) -> list[str]:
    """Where an event (or list of events, or user_data) would carry an unhashed identifier.

    Flags every hashed key (em ph fn ln ge db ct st zp country external_id) whose value is not
    a lowercase 64-hex digest, and any other string that looks like a raw email or phone
    number. Returns ``"<path>: <problem>"`` strings that never repeat the value; empty = clean.
    """
    problems: list[str] = []

    def walk(node: Any, path: str, key: str | None) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k), str(k))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]", key)
        elif key in HASHED_KEYS:
            if not (isinstance(node, str) and _HEX64.fullmatch(node)):
                problems.append(f"{path}: not a SHA-256 hex digest")
        elif isinstance(node, str) and key not in _SAFE_KEYS and (why := _raw_looking(node)):
            problems.append(f"{path}: {why}")

    walk(payload, "", None)
    return problems


_KEY_ALT = "|".join(HASHED_KEYS)
_HASHED_KEY_RE = rf'"(?:{_KEY_ALT})"\s*:'
_DIGEST_RE = r'"[0-9a-f]{64}"'
_HASHED_FIELD_OK_RE = (
    rf"{_HASHED_KEY_RE}\s*(?:\[\s*{_DIGEST_RE}(?:\s*,\s*{_DIGEST_RE})*\s*\]|{_DIGEST_RE})"
)
_NUMBER_RE = r"-?[0-9][0-9.eE+\-]*"
# fields the exact check never flags: id-like keys (string or number) and numeric amounts
_SAFE_FIELD_RE = (
    rf'"(?:{"|".join(sorted(_SAFE_KEYS))})"\s*:\s*(?:"(?:[^"\\]|\\.)*"|{_NUMBER_RE})'
    rf'|"(?:event_time|value)"\s*:\s*{_NUMBER_RE}'
)


def unhashed_identifier_problems(
    events: pl.DataFrame, *, payload: str = "payload", id_column: str = "event_id"
) -> pl.DataFrame:
    """contains_unhashed_identifier over a whole events frame: (``id_column``, problem) rows.

    A vectorized scan of the JSON text picks the suspects (a hashed key whose value is not a
    digest list, an '@' or a phone-like digit run outside the id fields, any \\u escape); only
    those are parsed and checked exactly, so a clean frame costs no per-event Python. The scan
    flags a superset of what the exact check finds; the answer is the exact check's.
    """
    schema = {id_column: pl.String, "problem": pl.String}
    if events.height == 0:
        return pl.DataFrame(schema=schema)
    text = pl.col(payload)
    scan = events.select(
        id_column,
        payload,
        _keys=text.str.count_matches(_HASHED_KEY_RE),
        _rest=text.str.replace_all(_SAFE_FIELD_RE, ""),
    ).with_columns(
        _digests=pl.col("_rest").str.count_matches(_HASHED_FIELD_OK_RE),
        _rest=pl.col("_rest").str.replace_all(_HASHED_FIELD_OK_RE, ""),
    )
    rest = pl.col("_rest")
    # a run of phone characters is a (superset) sign of a raw phone; the exact check counts digits
    suspect = (
        (pl.col("_keys") != pl.col("_digests"))
        | rest.str.contains("@", literal=True)
        | rest.str.contains(_PHONE_RUN.pattern)
        | text.str.contains("\\u", literal=True)
        | text.is_null()
    )
    events = scan.filter(suspect.fill_null(True))
    rows: list[tuple[str, str]] = []
    for key, body in events.select(id_column, payload).iter_rows():
        try:
            found = contains_unhashed_identifier(json.loads(body))
        except (TypeError, ValueError):
            found = ["payload: not valid JSON"]
        rows.extend((key, problem) for problem in found)
    return pl.DataFrame(rows, schema=schema, orient="row")


# ---------------------------------------------------------------------------------------------
# Warehouse tables -> the stage changes build_events takes


def crm_stage_changes(
    revenue: pl.DataFrame,
    stage_values: pl.DataFrame,
    attribution: pl.DataFrame,
    contacts: pl.DataFrame,
    leads: pl.DataFrame,
) -> pl.DataFrame:
    """Valued stage changes with the identity of the person behind each deal.

    Inputs are warehouse tables: ``revenue`` (synthetic_revenue: deal_id, account_id, pipeline,
    from_stage, to_stage, occurred_at, value_after, currency), ``stage_values`` (pipeline,
    stage_id, label, stage), ``attribution`` (attributed_revenue: deal_id, contact_id, lead_id;
    the contact the deal was attributed through), ``contacts`` (hubspot_contacts) and ``leads``
    (meta_leads). Returns ``STAGE_CHANGE_COLUMNS`` plus ``event_id`` and ``account_id``, one row
    per change: ``stage_name`` is the HubSpot stage label, ``value`` the stage's synthetic value,
    ``is_won`` when the stage maps to closed_won; identities are the contact's hashes, filled from
    its Meta lead-form lead where the contact lacks them; ``contact_created_at`` is the earlier
    of the contact's and the lead's creation (events must come after the lead).
    """
    rev = _frame(
        revenue,
        {
            "deal_id": pl.String,
            "account_id": pl.String,
            "pipeline": pl.String,
            "from_stage": pl.String,
            "to_stage": pl.String,
            "occurred_at": pl.Datetime("us", "UTC"),
            "value_after": pl.Float64,
            "currency": pl.String,
        },
    )
    stages = _frame(
        stage_values,
        {"pipeline": pl.String, "stage_id": pl.String, "label": pl.String, "stage": pl.String},
    ).unique(subset=["pipeline", "stage_id"], keep="first")
    who = (
        _frame(attribution, {"deal_id": pl.String, "contact_id": pl.String, "lead_id": pl.String})
        .sort("deal_id", "contact_id", nulls_last=True)
        .unique(subset="deal_id", keep="first")
        .rename({"lead_id": "_att_lead"})
    )
    ident = ("email_sha256", "phone_sha256", "fn_sha256", "ln_sha256")
    person = _frame(
        contacts,
        {
            "contact_id": pl.String,
            "created_at": pl.Datetime("us", "UTC"),
            **dict.fromkeys(ident, pl.String),
            "fbclid": pl.String,
            "fbc": pl.String,
            "lead_id": pl.String,
        },
    ).unique(subset="contact_id", keep="last")
    lead = _frame(
        leads,
        {
            "lead_id": pl.String,
            "created_at": pl.Datetime("us", "UTC"),
            **dict.fromkeys(ident, pl.String),
        },
    ).unique(subset="lead_id", keep="first")
    joined = (
        rev.join(
            stages, left_on=["pipeline", "to_stage"], right_on=["pipeline", "stage_id"], how="left"
        )
        .join(who, on="deal_id", how="left")
        .join(person, on="contact_id", how="left")
        .with_columns(lead_id=pl.coalesce("_att_lead", "lead_id"))
        .join(lead, on="lead_id", how="left", suffix="_lead")
    )
    out = joined.with_columns(
        [pl.coalesce(c, f"{c}_lead").alias(c) for c in ident]
        + [
            pl.col("label").alias("stage_name"),
            pl.col("value_after").alias("value"),
            (pl.col("stage") == "closed_won").fill_null(False).alias("is_won"),
            pl.min_horizontal("created_at", "created_at_lead").alias("contact_created_at"),
        ]
    )
    out = out.with_columns(event_id_expr_frame(out))
    return out.select("event_id", "account_id", *STAGE_CHANGE_COLUMNS)


def _frame(df: pl.DataFrame, schema: Mapping[str, Any]) -> pl.DataFrame:
    """``schema`` columns of ``df`` cast to their types; missing ones are null."""
    if not df.columns:  # a table not created yet: no rows (literals alone would make one)
        return pl.DataFrame(schema=dict(schema))
    return df.select(
        [
            pl.col(c).cast(t) if c in df.columns else pl.lit(None, dtype=t).alias(c)
            for c, t in schema.items()
        ]
    )
