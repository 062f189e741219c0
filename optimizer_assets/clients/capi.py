"""Meta Conversions API upload (CONTRACTS.md section 1); events are built and hashed elsewhere.

`send_events` posts already-normalized events (hashed `user_data`, deterministic `event_id`)
as a JSON body. Retrying a request is safe because Meta deduplicates on
(`event_name`, `event_id`) within 48 h; a rejection (one bad event rejects the whole request)
raises `CapiRejectedError` with Meta's message, code, subcode and fbtrace_id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optimizer_assets.clients.errors import CapiRejectedError, TooManyItemsError
from optimizer_assets.clients.graph import MetaClient

CAPI_EVENT_LIMIT = 1000


class CapiClient(MetaClient):
    """Conversions API client for one system-user token (sandbox or Meta)."""

    service = "Conversions API"
    error_class = CapiRejectedError

    def send_events(
        self,
        pixel_id: str,
        events: Sequence[Mapping[str, Any]],
        test_event_code: str | None = None,
    ) -> dict[str, Any]:
        """Upload at most 1,000 events; return Meta's answer.

        The answer looks like `{"events_received": N, "messages": [], "fbtrace_id": "..."}`.

        An empty list makes no call and answers `events_received = 0`. More than 1,000 raises
        `TooManyItemsError` before any call. A rejection raises `CapiRejectedError`.
        """
        if len(events) > CAPI_EVENT_LIMIT:
            raise TooManyItemsError(
                f"Conversions API takes at most {CAPI_EVENT_LIMIT} events per request, "
                f"got {len(events)}; split them"
            )
        if not events:
            return {"events_received": 0, "messages": [], "fbtrace_id": None}
        payload: dict[str, Any] = {"data": [dict(e) for e in events]}
        if test_event_code:
            payload["test_event_code"] = test_event_code
        answer = self.request("POST", self._path(str(pixel_id), "events"), json=payload)
        return answer if isinstance(answer, dict) else {"answer": answer}
