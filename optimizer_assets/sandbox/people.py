"""Synthetic identities for the sandbox world: names, emails, phones and click ids.

People are stored as small integer codes (indexes into the vocabularies below plus style
codes) drawn from the world's seeded generator; the raw strings are only spelled out when a
frame is built, vectorized with polars. Raw PII never leaves the sandbox world.
"""

from __future__ import annotations

import numpy as np
import polars as pl

FIRST_NAMES = np.array(
    """
    James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara
    Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy
    Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew
    Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Melissa George Deborah Timothy
    Stephanie Ronald Rebecca Jason Sharon Edward Laura Jeffrey Cynthia Ryan Kathleen Jacob Amy
    Gary Angela Nicholas Shirley Eric Anna Jonathan Brenda Stephen Pamela Larry Emma Justin
    Nicole Scott Helen Brandon Samantha Benjamin Katherine Samuel Christine Gregory Debra
    Alexander Rachel Patrick Carolyn Frank Janet Raymond Maria Jack Olivia Dennis Heather Jerry
    Helena Tyler Diane Aaron Julie Jose Joyce Adam Victoria Nathan Ruth Henry Virginia Zachary
    Lauren Douglas Kelly Peter Christina Kyle Joan Noah Evelyn Ethan Judith Jeremy Andrea Walter
    Hannah Christian Megan Keith Cheryl Roger Jacqueline Terry Martha Austin Madison Sean Teresa
    Gerald Gloria Carl Sara Harold Janice Dylan Ann Arthur Kathryn Lawrence Abigail Jordan
    Sophia Jesse Frances Bryan Jean Billy Alice Bruce Judy Gabriel Isabella Joe Julia Logan
    Grace Alan Amber Juan Denise Albert Danielle Willie Marilyn Elijah Beverly Wayne Charlotte
    Randy Natalie Vincent Theresa Mason Diana Roy Brittany Ralph Doris Bobby Kayla Russell
    Alexis Bradley Lori Philip Marie Eugene Priya Wei Mohammed Aisha Hiroshi Yuki Carlos Lucia
    Dmitri Ingrid
    """.split()  # noqa: SIM905 - a name list reads best as a block
)

LAST_NAMES = np.array(
    """
    Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez
    Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris
    Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill
    Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips
    Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales Murphy Cook
    Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward
    Richardson Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez
    Castillo Sanders Patel Myers Long Ross Foster Jimenez Powell Jenkins Perry Russell Sullivan
    Bell Coleman Butler Henderson Barnes Gonzales Fisher Vasquez Simmons Romero Jordan Patterson
    Alexander Hamilton Graham Reynolds Griffin Wallace Moreno West Cole Hayes Bryant Herrera
    Gibson Ellis Tran Medina Aguilar Stevens Murray Ford Castro Marshall Owens Harrison
    Fernandez McDonald Woods Washington Kennedy Wells Vargas Henry Chen Freeman Webb Tucker
    Guzman Burns Crawford Olson Simpson Porter Hunter Gordon Mendez Silva Shaw Snyder Mason
    Dixon Munoz Hunt Hicks Holmes Palmer Wagner Black Robertson Boyd Rose Stone Salazar Fox
    Warren Mills Meyer Rice Schmidt Garza Daniels Ferguson Nichols Stephens Soto Weaver Ryan
    Gardner Payne Grant Dunn Kowalski Okafor Yamamoto Schneider Novak Larsen O'Brien Dubois
    """.split()  # noqa: SIM905 - a name list reads best as a block
)

# email local parts: lowercase, apostrophes dropped ("O'Brien" -> "obrien")
_FIRST_LOWER = np.char.replace(np.char.lower(FIRST_NAMES), "'", "")
_LAST_LOWER = np.char.replace(np.char.lower(LAST_NAMES), "'", "")

PERSONAL_DOMAINS = np.array(
    ["gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "aol.com", "proton.me",
     "comcast.net", "live.com", "msn.com"]
)  # fmt: skip
# Personal-domain popularity (gmail dominates, as in real US lead lists).
DOMAIN_WEIGHTS = np.array([0.52, 0.12, 0.08, 0.07, 0.08, 0.03, 0.02, 0.03, 0.03, 0.02])

AREA_CODES = np.array(
    [
        "201", "202", "206", "212", "213", "214", "216", "301", "303", "305", "310", "312", "313",
        "314", "404", "407", "412", "415", "425", "469", "480", "503", "512", "602", "609", "612",
        "614", "615", "617", "619", "626", "646", "650", "678", "702", "704", "713", "714", "718",
        "720", "727", "732", "773", "786", "801", "813", "818", "832", "858", "904", "916", "919",
        "925", "949", "954", "972",
    ]
)  # fmt: skip

# Phone spellings seen in real CRM exports; all carry the same 10 national digits.
PHONE_STYLES = (
    "+1 (AAA) EEE-LLLL",
    "AAA.EEE.LLLL",
    "1AAAEEELLLL",
    "(AAA) EEE-LLLL",
    "AAA-EEE-LLLL",
    "+1AAAEEELLLL",
    "AAAEEELLLL",
    "+1 AAA EEE LLLL",
    "1-AAA-EEE-LLLL",
)
N_PHONE_STYLES = len(PHONE_STYLES)
# Meta lead forms return E.164 most of the time; people typing in HubSpot forms vary more.
LEAD_FORM_PHONE_WEIGHTS = np.array([0.05, 0.0, 0.05, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0])
FORM_PHONE_WEIGHTS = np.array([0.15, 0.12, 0.08, 0.2, 0.2, 0.05, 0.12, 0.04, 0.04])

N_EMAIL_STYLES = 5  # first.last, firstlast, flast, first_last, firstl
# Email case/whitespace variants: plain, Capitalized, UPPER, padded, trailing space.
EMAIL_CASE_WEIGHTS = np.array([0.8, 0.08, 0.03, 0.05, 0.04])
N_EMAIL_CASES = len(EMAIL_CASE_WEIGHTS)

FBCLID_ALPHABET = np.frombuffer(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8
)
FBCLID_WORDS = 3  # 192 random bits -> 32 url-safe characters after the "IwAR" prefix


def _gather(values: np.ndarray, codes: np.ndarray) -> pl.Series:
    """Strings of a vocabulary at the given codes (polars gather: compact, no numpy <U)."""
    return pl.Series(values).gather(np.asarray(codes, dtype=np.int64))


def pick(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """n category codes (int8) drawn with the given weights (cheaper than rng.choice)."""
    cum = np.cumsum(weights, dtype=np.float64)
    return np.searchsorted(cum / cum[-1], rng.random(n), side="right").astype(np.int8)


def draw_people(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draw n synthetic people as integer codes (names, email parts, phone digits)."""
    email_num = rng.integers(1, 10_000, n).astype(np.int16)
    email_num[rng.random(n) < 0.35] = -1  # about a third have no digits in their email
    domain = pick(rng, DOMAIN_WEIGHTS, n)
    n_domains = len(PERSONAL_DOMAINS)
    return {
        "first": rng.integers(0, len(FIRST_NAMES), n).astype(np.int16),
        "last": rng.integers(0, len(LAST_NAMES), n).astype(np.int16),
        "email_style": rng.integers(0, N_EMAIL_STYLES, n).astype(np.int8),
        "email_num": email_num,
        "domain": domain,
        "area": rng.integers(0, len(AREA_CODES), n).astype(np.int8),
        "exchange": rng.integers(200, 1000, n).astype(np.int16),
        "line": rng.integers(0, 10_000, n).astype(np.int16),
        # a second address some people use (work or old account), always on another domain
        "alt_email_style": rng.integers(0, N_EMAIL_STYLES, n).astype(np.int8),
        "alt_email_num": rng.integers(10, 1000, n).astype(np.int16),
        "alt_domain": ((domain + rng.integers(1, n_domains, n)) % n_domains).astype(np.int8),
    }


def draw_phone_styles(rng: np.random.Generator, n: int, *, lead_form: bool) -> np.ndarray:
    """Phone spelling codes: E.164-heavy for Meta lead forms, varied for website forms."""
    weights = LEAD_FORM_PHONE_WEIGHTS if lead_form else FORM_PHONE_WEIGHTS
    return pick(rng, weights, n)


def draw_email_cases(rng: np.random.Generator, n: int) -> np.ndarray:
    """Email case/whitespace variant codes (mostly plain lowercase)."""
    return pick(rng, EMAIL_CASE_WEIGHTS, n)


def per_code(frame: pl.DataFrame, code: str, exprs: dict[int, pl.Expr]) -> pl.Series:
    """Evaluate ``exprs[c]`` only on the rows whose ``code`` column is c (null elsewhere).

    A polars when/then chain computes every branch on every row; spelling strings per code
    group instead keeps the work (and the temporary memory) to one pass over the rows.
    """
    framed = frame.with_row_index("_row")
    parts = [
        framed.filter(pl.col(code) == c).select("_row", expr.cast(pl.Utf8).alias("v"))
        for c, expr in exprs.items()
    ]
    rest = framed.filter(~pl.col(code).is_in(list(exprs))).select(
        "_row", pl.lit(None, dtype=pl.Utf8).alias("v")
    )
    return pl.concat([*parts, rest]).sort("_row")["v"]


def phone_strings(
    area: np.ndarray, exchange: np.ndarray, line: np.ndarray, style: np.ndarray
) -> pl.Series:
    """Spell phone numbers in the given style codes (null where style < 0)."""
    frame = pl.DataFrame(
        {
            "a": _gather(AREA_CODES, area),
            "e": np.asarray(exchange).astype(np.int64),
            "l": np.asarray(line).astype(np.int64),
            "s": np.asarray(style).astype(np.int8),
        }
    ).with_columns(pl.col("e").cast(pl.Utf8).str.zfill(3), pl.col("l").cast(pl.Utf8).str.zfill(4))
    exprs = {}
    for code, pattern in enumerate(PHONE_STYLES):
        parts: list[pl.Expr] = []
        rest = pattern
        while rest:
            head, key, rest = _split_phone_pattern(rest)
            if head:
                parts.append(pl.lit(head))
            if key:
                parts.append(pl.col(key))
        exprs[code] = pl.concat_str(parts)
    return per_code(frame, "s", exprs).alias("phone")


def _split_phone_pattern(pattern: str) -> tuple[str, str | None, str]:
    """Split 'xx AAA rest' into literal head, column key ('a'/'e'/'l') and remaining pattern."""
    tokens = {"AAA": "a", "EEE": "e", "LLLL": "l"}
    best = None
    for token in tokens:
        pos = pattern.find(token)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, token)
    if best is None:
        return pattern, None, ""
    pos, token = best
    return pattern[:pos], tokens[token], pattern[pos + len(token) :]


def email_strings(
    first: np.ndarray,
    last: np.ndarray,
    style: np.ndarray,
    num: np.ndarray,
    domain: np.ndarray,
    case: np.ndarray,
) -> pl.Series:
    """Spell emails from codes; case codes add the uppercase/whitespace noise real CRMs hold."""
    frame = pl.DataFrame(
        {
            "f": _gather(_FIRST_LOWER, first),
            "l": _gather(_LAST_LOWER, last),
            "s": np.asarray(style).astype(np.int8),
            "n": np.asarray(num).astype(np.int64),
            "d": _gather(PERSONAL_DOMAINS, domain),
            "c": np.asarray(case).astype(np.int8),
        }
    )
    f, ln = pl.col("f"), pl.col("l")
    local = per_code(
        frame,
        "s",
        {
            0: pl.concat_str([f, pl.lit("."), ln]),
            1: pl.concat_str([f, ln]),
            2: pl.concat_str([f.str.slice(0, 1), ln]),
            3: pl.concat_str([f, pl.lit("_"), ln]),
            4: pl.concat_str([f, ln.str.slice(0, 1)]),
        },
    )
    suffix = pl.when(pl.col("n") >= 0).then(pl.col("n").cast(pl.Utf8)).otherwise(pl.lit(""))
    frame = frame.select(
        pl.concat_str([pl.lit(local), suffix, pl.lit("@"), pl.col("d")]).alias("p"), "c"
    )
    plain = pl.col("p")
    return per_code(
        frame,
        "c",
        {
            0: plain,
            1: pl.concat_str([plain.str.slice(0, 1).str.to_uppercase(), plain.str.slice(1)]),
            2: plain.str.to_uppercase(),
            3: pl.concat_str([pl.lit(" "), plain, pl.lit(" ")]),
            4: pl.concat_str([plain, pl.lit(" ")]),
        },
    ).alias("email")


def canonical_emails(
    first: np.ndarray, last: np.ndarray, style: np.ndarray, num: np.ndarray, domain: np.ndarray
) -> pl.Series:
    """Normalized (trimmed, lowercase) emails: what CAPI hashing should see."""
    zeros = np.zeros(len(first), dtype=np.int8)
    return email_strings(first, last, style, num, domain, zeros)


def canonical_phones(area: np.ndarray, exchange: np.ndarray, line: np.ndarray) -> pl.Series:
    """Normalized phones: digits with the US country code, e.g. '16505550134'."""
    style = np.full(len(area), PHONE_STYLES.index("1AAAEEELLLL"), dtype=np.int8)
    return phone_strings(area, exchange, line, style)


def name_strings(first: np.ndarray, last: np.ndarray) -> tuple[pl.Series, pl.Series]:
    """First and last names from codes."""
    return _gather(FIRST_NAMES, first).alias("firstname"), _gather(LAST_NAMES, last).alias(
        "lastname"
    )


def draw_fbclid_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random bits behind each click's fbclid, shape (n, FBCLID_WORDS) uint64."""
    return rng.integers(0, np.iinfo(np.uint64).max, (n, FBCLID_WORDS), dtype=np.uint64)


def fbclid_strings(words: np.ndarray) -> pl.Series:
    """Encode fbclid bits as url-safe strings like 'IwAR3kq...' (vectorized base64url)."""
    n = len(words)
    if n == 0:
        return pl.Series("fbclid", [], dtype=pl.Utf8)
    raw = np.ascontiguousarray(words, dtype="<u8").view(np.uint8).reshape(n, -1)
    bits = np.unpackbits(raw, axis=1)
    n_chars = -(-bits.shape[1] // 6)
    pad = n_chars * 6 - bits.shape[1]
    if pad:
        bits = np.concatenate([bits, np.zeros((n, pad), dtype=np.uint8)], axis=1)
    idx = bits.reshape(n, n_chars, 6) @ np.array([32, 16, 8, 4, 2, 1], dtype=np.uint8)
    prefix = np.broadcast_to(np.frombuffer(b"IwAR", dtype=np.uint8), (n, 4))
    chars = np.ascontiguousarray(np.concatenate([prefix, FBCLID_ALPHABET[idx]], axis=1))
    return pl.Series("fbclid", chars.view(f"S{n_chars + 4}").ravel()).cast(pl.Utf8)
