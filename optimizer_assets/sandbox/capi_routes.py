"""Conversions API route of the sandbox: ``POST /{pixel_id}/events`` with full validation.

One invalid event rejects the whole request (Graph error 100 naming the event index and the
reason); valid requests are stored through ``World.receive_capi``, which deduplicates on
(event_name, event_id) within 48 h. Events sent with ``test_event_code`` are validated and
counted but, like Meta's test events, never reach the world's attribution data.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from optimizer_assets.sandbox.graph_paging import GraphError
from optimizer_assets.sandbox.server_state import SandboxState

ACTION_SOURCES = {
    "email", "website", "app", "phone_call", "chat", "physical_store", "system_generated",
    "business_messaging", "other",
}  # fmt: skip
HASHED_KEYS = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id")
PLAIN_ID_KEYS = (
    "client_ip_address", "fbc", "fbp", "lead_id", "subscription_id", "fb_login_id", "madid",
    "anon_id", "ctwa_clid", "page_id",
)  # fmt: skip
MAX_AGE_DAYS = 7
MAX_AGE_DAYS_PHYSICAL_STORE = 62
MAX_FUTURE_SECONDS = 600  # clock skew tolerated for event_time ahead of the simulated clock
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LEAD_ID = re.compile(r"^\d{15,16}$")
_CURRENCY = re.compile(r"^[A-Za-z]{3}$")


class InvalidEvent(ValueError):
    """One event breaks the contract; the message is the reason."""


def decode_data(raw: Any) -> list[Any]:
    """``data`` as a list of events: a JSON array (string or decoded) whose items may be
    JSON-encoded strings, as the official SDK form-encodes them."""
    if raw is None or raw == "":
        raise GraphError("(#100) The parameter data is required")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise GraphError("(#100) param data must be a JSON array of events") from exc
    if not isinstance(raw, list):
        raise GraphError("(#100) param data must be a JSON array of events")
    events = []
    for index, item in enumerate(raw):
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except ValueError as exc:
                raise _event_error(index, "is not valid JSON") from exc
        events.append(item)
    return events


def _event_error(index: int, reason: str) -> GraphError:
    return GraphError(
        f"(#100) Invalid parameter: event {index}: {reason}",
        code=100,
        user_title="Invalid event",
        user_msg=f"Event {index}: {reason}",
    )


def _check_hashed(key: str, value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise InvalidEvent(f"user_data.{key} must not be empty")
    for item in values:
        if not isinstance(item, str) or not _SHA256.match(item):
            raise InvalidEvent(
                f"user_data.{key} must be a lowercase hex SHA-256 digest (64 characters)"
            )


def _validate_user_data(user_data: Any) -> None:
    if not isinstance(user_data, dict):
        raise InvalidEvent("user_data is required and must be an object")
    for key in HASHED_KEYS:
        if key in user_data and user_data[key] is not None:
            _check_hashed(key, user_data[key])
    if user_data.get("lead_id") is not None:
        lead_id = user_data["lead_id"]
        if isinstance(lead_id, bool) or not _LEAD_ID.match(str(lead_id)):
            raise InvalidEvent("user_data.lead_id must be the 15-16 digit Lead Ads id, unhashed")
    if not any(user_data.get(k) not in (None, "", []) for k in (*HASHED_KEYS, *PLAIN_ID_KEYS)):
        raise InvalidEvent("user_data carries no customer information parameter")


def _validate_custom_data(custom_data: Any, action_source: str) -> None:
    if custom_data is None:
        return
    if not isinstance(custom_data, dict):
        raise InvalidEvent("custom_data must be an object")
    value = custom_data.get("value")
    if value is not None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidEvent("custom_data.value must be a number")
        currency = custom_data.get("currency")
        if not isinstance(currency, str) or not _CURRENCY.match(currency):
            raise InvalidEvent("custom_data.currency (ISO 4217) is required with custom_data.value")
    if custom_data.get("event_source") == "crm":
        if action_source != "system_generated":
            raise InvalidEvent("CRM events (event_source=crm) need action_source=system_generated")
        lead_source = custom_data.get("lead_event_source")
        if not isinstance(lead_source, str) or not lead_source:
            raise InvalidEvent("CRM events need custom_data.lead_event_source (the CRM's name)")


def validate_event(event: Any, now_epoch: int) -> None:
    """Raise :class:`InvalidEvent` when one event breaks CONTRACTS.md section 1."""
    if not isinstance(event, dict):
        raise InvalidEvent("must be a JSON object")
    name = event.get("event_name")
    if not isinstance(name, str) or not name:
        raise InvalidEvent("event_name is required")
    event_time = event.get("event_time")
    if event_time is None:
        raise InvalidEvent("event_time is required")
    if isinstance(event_time, bool) or not isinstance(event_time, int):
        raise InvalidEvent("event_time must be an integer (Unix seconds)")
    action_source = event.get("action_source")
    if action_source is None:
        raise InvalidEvent("action_source is required")
    if action_source not in ACTION_SOURCES:
        raise InvalidEvent(f"action_source {action_source!r} is not one of the allowed values")
    max_days = MAX_AGE_DAYS_PHYSICAL_STORE if action_source == "physical_store" else MAX_AGE_DAYS
    if event_time < now_epoch - max_days * 86400:
        raise InvalidEvent(f"event_time is more than {max_days} days in the past")
    if event_time > now_epoch + MAX_FUTURE_SECONDS:
        raise InvalidEvent("event_time is in the future")
    user_data = event.get("user_data")
    _validate_user_data(user_data)
    if action_source == "website":
        url = event.get("event_source_url")
        if not isinstance(url, str) or not url:
            raise InvalidEvent("website events need event_source_url")
        if not user_data.get("client_user_agent"):
            raise InvalidEvent("website events need user_data.client_user_agent")
    event_id = event.get("event_id")
    if event_id is not None and (isinstance(event_id, bool) or not isinstance(event_id, str | int)):
        raise InvalidEvent("event_id must be a string")
    _validate_custom_data(event.get("custom_data"), action_source)


def handle_events(state: SandboxState, pixel_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate the whole request, then store it; answers the CAPI success body."""
    events = decode_data(params.get("data"))
    cap = state.limits.capi_max_events
    if len(events) > cap:
        raise GraphError(
            f"(#100) param data must be an array of at most {cap} events, got {len(events)}"
        )
    if not events:
        raise GraphError("(#100) param data must contain at least one event")
    now_epoch = int(state.world.now.timestamp())
    for index, event in enumerate(events):
        try:
            validate_event(event, now_epoch)
        except InvalidEvent as exc:
            raise _event_error(index, str(exc)) from exc
    test_code = params.get("test_event_code")
    if test_code not in (None, ""):
        if not isinstance(test_code, str):
            raise GraphError("(#100) test_event_code must be a string")
        state.capi_test_events[pixel_id] += len(events)
    else:
        state.world.receive_capi(pixel_id, events)
        state.bump()
    return {"events_received": len(events), "messages": [], "fbtrace_id": state.fbtrace_id()}
