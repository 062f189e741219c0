"""HTTP clients for HubSpot, the Graph API and the Conversions API (requests-based, no Dagster).

They speak the wire contracts of `CONTRACTS.md`; sandbox or live differs only in base URL,
API version and token, all passed to the constructors (the caller reads the environment).
"""

from optimizer_assets.clients.capi import CAPI_EVENT_LIMIT, CapiClient
from optimizer_assets.clients.errors import (
    APIError,
    BudgetEditLimitError,
    CapiRejectedError,
    ClientError,
    GraphAPIError,
    HubSpotAPIError,
    RetriesExhaustedError,
    ThrottledError,
    TooManyItemsError,
    TransportError,
)
from optimizer_assets.clients.graph import (
    AD_FIELDS,
    AD_FIELDS_WITH_TRAITS,
    BATCH_LIMIT,
    INSIGHT_FIELDS,
    BatchItem,
    BatchResult,
    GraphClient,
)
from optimizer_assets.clients.http import RetryPolicy, SlidingWindowLimiter
from optimizer_assets.clients.hubspot import CONTACT_PROPERTIES, DEAL_PROPERTIES, HubSpotClient

__all__ = [
    "AD_FIELDS",
    "AD_FIELDS_WITH_TRAITS",
    "CONTACT_PROPERTIES",
    "DEAL_PROPERTIES",
    "INSIGHT_FIELDS",
    "APIError",
    "BATCH_LIMIT",
    "BatchItem",
    "BatchResult",
    "BudgetEditLimitError",
    "CAPI_EVENT_LIMIT",
    "CapiClient",
    "CapiRejectedError",
    "ClientError",
    "GraphAPIError",
    "GraphClient",
    "HubSpotAPIError",
    "HubSpotClient",
    "RetriesExhaustedError",
    "RetryPolicy",
    "SlidingWindowLimiter",
    "ThrottledError",
    "TooManyItemsError",
    "TransportError",
]
