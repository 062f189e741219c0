"""Graph-style helpers shared by the Graph and CAPI routes: errors, fields, cursors, params."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import polars as pl

DEFAULT_LIMIT = 25
MAX_LIMIT = 5000  # larger `limit` values are clamped, as the Graph API does on most edges


class GraphError(Exception):
    """A Graph error that becomes the ``{"error": {...}}`` envelope."""

    def __init__(
        self,
        message: str,
        *,
        code: int = 100,
        subcode: int | None = None,
        http_status: int = 400,
        error_type: str = "OAuthException",
        transient: bool = False,
        user_title: str | None = None,
        user_msg: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.subcode = subcode
        self.http_status = http_status
        self.error_type = error_type
        self.transient = transient
        self.user_title = user_title
        self.user_msg = user_msg

    def envelope(self, fbtrace_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "code": self.code,
            "fbtrace_id": fbtrace_id,
        }
        if self.subcode is not None:
            error["error_subcode"] = self.subcode
        if self.transient:
            error["is_transient"] = True
        if self.user_title:
            error["error_user_title"] = self.user_title
        if self.user_msg:
            error["error_user_msg"] = self.user_msg
        return {"error": error}


def not_found(object_id: str, method: str = "get") -> GraphError:
    return GraphError(
        f"Unsupported {method} request. Object with ID '{object_id}' does not exist, cannot be "
        "loaded due to missing permissions, or does not support this operation. Please read the "
        "Graph API documentation at https://developers.facebook.com/docs/graph-api",
        code=100,
        subcode=33,
        error_type="GraphMethodException",
    )


@dataclass
class GraphResult:
    """What one Graph call answers (the HTTP layer and the batch endpoint both render it)."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


# ---- fields ------------------------------------------------------------------------------------
def parse_fields(spec: Any) -> list[tuple[str, list | None]]:
    """``"a,b,creative{title,body}"`` -> ``[("a", None), ("b", None), ("creative", [...])]``."""
    if spec is None or spec == "":
        return []
    if isinstance(spec, list):
        spec = ",".join(str(s) for s in spec)
    text = str(spec)
    pos = 0

    def parse_list(depth: int) -> list[tuple[str, list | None]]:
        nonlocal pos
        out: list[tuple[str, list | None]] = []
        name = ""
        while pos < len(text):
            ch = text[pos]
            pos += 1
            if ch == ",":
                if name.strip():
                    out.append((name.strip(), None))
                name = ""
            elif ch == "{":
                sub = parse_list(depth + 1)
                out.append((name.strip(), sub))
                name = ""
                # skip a following comma
                if pos < len(text) and text[pos] == ",":
                    pos += 1
            elif ch == "}":
                if depth == 0:
                    raise GraphError(f"(#100) Syntax error in fields: unexpected '}}' in {text!r}")
                if name.strip():
                    out.append((name.strip(), None))
                return out
            else:
                name += ch
        if depth > 0:
            raise GraphError(f"(#100) Syntax error in fields: missing '}}' in {text!r}")
        if name.strip():
            out.append((name.strip(), None))
        return out

    fields = parse_list(0)
    for name, _ in fields:
        # Graph field modifiers like `.limit(5)` or `.as(x)` are not supported by the sandbox
        if not name.replace("_", "").isalnum():
            raise GraphError(f"(#100) Syntax error in fields near {name!r}")
    return fields


def check_fields(fields: list[tuple[str, list | None]], allowed: set[str], node: str) -> None:
    for name, _ in fields:
        if name not in allowed:
            raise GraphError(
                f"(#100) Tried accessing nonexisting field ({name}) on node type ({node})"
            )


def select_nested(value: dict[str, Any], sub: list | None) -> dict[str, Any]:
    """Keep only the requested sub-fields of a nested object (all of them when ``sub`` is None)."""
    if sub is None or not isinstance(value, dict):
        return value
    out = {"id": value["id"]} if "id" in value else {}
    for name, inner in sub:
        if name in value and value[name] is not None:
            out[name] = select_nested(value[name], inner)
    return out


# ---- params ------------------------------------------------------------------------------------
def json_param(params: dict[str, Any], name: str) -> Any:
    """A parameter that may arrive JSON-encoded (query/form) or already decoded (JSON body)."""
    value = params.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise GraphError(f"(#100) param {name} must be valid JSON") from exc
    return value


def int_param(params: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise GraphError(f"(#100) param {name} must be an integer")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not text.lstrip("-").isdigit():
        raise GraphError(f"(#100) param {name} must be an integer")
    return int(text)


# ---- cursors -----------------------------------------------------------------------------------
def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.urlsafe_b64decode(padded.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise GraphError("(#100) Invalid cursor") from exc


def page_frame(
    frame: pl.DataFrame,
    params: dict[str, Any],
    link: Any,
    *,
    key: str = "_key",
    default_limit: int = DEFAULT_LIMIT,
) -> tuple[pl.DataFrame, dict[str, Any] | None]:
    """One keyset page of ``frame`` (sorted ascending by the unique string column ``key``).

    Cursors carry the key of the first/last row, so rows added to the world between two pages
    never cause duplicates; ``next`` is present only while rows remain after the page.
    """
    limit = int_param(params, "limit", default_limit)
    if limit is None or limit < 0:
        raise GraphError("(#100) param limit must be a non-negative integer")
    limit = min(limit, MAX_LIMIT)
    keys = frame.get_column(key)
    height = frame.height
    after, before = params.get("after"), params.get("before")
    if after:
        start = int(keys.search_sorted(decode_cursor(str(after)), side="right"))
        end = min(height, start + limit)
    elif before:
        end = int(keys.search_sorted(decode_cursor(str(before)), side="left"))
        start = max(0, end - limit)
    else:
        start, end = 0, min(height, limit)
    page = frame.slice(start, max(0, end - start))
    if page.height == 0:
        return page, None
    first, last = encode_cursor(page[key][0]), encode_cursor(page[key][-1])
    paging: dict[str, Any] = {"cursors": {"before": first, "after": last}}
    if end < height:
        paging["next"] = link(after=last)
    if start > 0:
        paging["previous"] = link(before=first)
    return page, paging


def make_link(base_url: str, version: str, path: str, params: dict[str, Any]):
    """A function building ``next``/``previous`` URLs that repeat the request's parameters."""
    kept = {
        k: (v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))
        for k, v in params.items()
        if k not in ("after", "before") and v is not None
    }

    def link(**cursor: str) -> str:
        query = urlencode({**kept, **cursor})
        return f"{base_url}{version}/{path}?{query}"

    return link


def pad_id(column: str) -> pl.Expr:
    """Zero-padded id so that string order equals numeric order in cursor keys."""
    return pl.col(column).cast(pl.String).str.zfill(20)
