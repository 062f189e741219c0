"""Per-account settings: the checked-in ``data/accounts.yaml``, validated when loaded.

A bad file fails at load time with the line and the reason, e.g.
``data/accounts.yaml:14: accounts[1].currency: 'US' is not an ISO 4217 code``.
No Dagster here: the Dagster resources call :func:`load_settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pycountry
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

DEFAULT_SETTINGS_PATH = Path(__file__).resolve().parent.parent / "data" / "accounts.yaml"


class SettingsError(ValueError):
    """The settings file is malformed; the message names the file, the line and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LearningSettings(_Strict):
    """Which learners may change this account's budgets (issue 7; measured by
    ``python -m optimizer_assets.bench learning_regret``). A learner is on by default only when
    that benchmark showed it lowers regret on the sandbox truth (README: drift_discount and
    forget_changes)."""

    cross_account_boost: StrictBool = False  # boost new ads matching cross-account patterns
    winner_priors: StrictBool = False  # cold-start priors for new ads from similar winners
    drift_discount: StrictBool = True  # discount evidence from before a detected drift
    # forget evidence from before each ad's (or its account's) CTR change day
    # (sampler.evidence_weights via performance.forget_changes)
    forget_changes: StrictBool = True


class AccountSettings(_Strict):
    """Everything the optimizer needs to know about one ad account."""

    account_id: str = Field(pattern=r"^\d{1,20}$", description="Meta ad account id, no 'act_'")
    name: str = ""
    hubspot_pipeline_id: str | None = None
    pixel_id: str | None = Field(default=None, pattern=r"^\d{1,20}$")
    currency: str = "USD"
    timezone: str = "UTC"
    default_country: str = "us"
    revenue_preset: Literal["service_business", "ecommerce", "b2b_saas"] = "service_business"
    stage_values: dict[str, float] = Field(default_factory=dict)
    mode: Literal["pipeline", "direct"] = "pipeline"
    auto_apply: bool = False
    sampler: dict[str, Any] = Field(default_factory=dict)
    guardrails: dict[str, Any] = Field(default_factory=dict)
    winners: dict[str, Any] = Field(default_factory=dict)
    learning: LearningSettings = Field(default_factory=LearningSettings)

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        if pycountry.currencies.get(alpha_3=value.upper()) is None:
            raise ValueError(f"{value!r} is not an ISO 4217 currency code")
        return value.upper()

    @field_validator("default_country")
    @classmethod
    def _country(cls, value: str) -> str:
        if pycountry.countries.get(alpha_2=value.upper()) is None:
            raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-2 country code")
        return value.lower()

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"{value!r} is not an IANA timezone") from exc
        return value


class _File(_Strict):
    defaults: dict[str, Any] = Field(default_factory=dict)
    accounts: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """The validated file: explicit accounts plus the defaults for accounts found later."""

    path: Path
    defaults: Mapping[str, Any]
    accounts: tuple[AccountSettings, ...] = field(default_factory=tuple)

    def for_account(self, account_id: str, **discovered: Any) -> AccountSettings:
        """Settings of one account: its own entry, else the defaults plus what was discovered."""
        for account in self.accounts:
            if account.account_id == account_id:
                return account
        return AccountSettings(**{**self.defaults, **discovered, "account_id": account_id})

    def pipeline_accounts(self) -> dict[str, str]:
        """HubSpot pipeline id -> ad account id, for the accounts that name one."""
        return {a.hubspot_pipeline_id: a.account_id for a in self.accounts if a.hubspot_pipeline_id}


def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict:
    """Map every key path in the YAML document to the 1-based line where it starts."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            out[(*path, key_node.value)] = key_node.start_mark.line + 1
            _line_index(value_node, (*path, key_node.value), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), out)
    return out


def _nearest_line(lines: dict, loc: tuple) -> int:
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(file)"


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Load and validate the accounts file (``data/accounts.yaml`` or $OPTIMIZER_ACCOUNTS_FILE)."""
    path = Path(path or os.environ.get("OPTIMIZER_ACCOUNTS_FILE") or DEFAULT_SETTINGS_PATH)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file ({exc.strerror})") from exc
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise SettingsError(
            f"{path}:{line}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from exc
    lines = _line_index(node) if node is not None else {(): 1}
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}:1: expected a mapping with 'defaults' and 'accounts'")

    def fail(loc: tuple, reason: str) -> SettingsError:
        return SettingsError(f"{path}:{_nearest_line(lines, loc)}: {_format_loc(loc)}: {reason}")

    try:
        parsed = _File(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(tuple(err["loc"]), err["msg"]) from None
    try:
        defaults = AccountSettings(**{**parsed.defaults, "account_id": "0"})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(("defaults", *err["loc"]), err["msg"]) from None
    accounts = []
    seen: set[str] = set()
    for i, entry in enumerate(parsed.accounts):
        try:
            account = AccountSettings(**{**parsed.defaults, **entry})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ("accounts", i, *err["loc"]) if err["loc"] else ("accounts", i)
            raise fail(loc, err["msg"]) from None
        if account.account_id in seen:
            raise fail(("accounts", i, "account_id"), f"duplicate account {account.account_id}")
        seen.add(account.account_id)
        accounts.append(account)
    per_account = {"account_id", "name", "hubspot_pipeline_id", "pixel_id"}
    defaults_dict = defaults.model_dump(exclude=per_account)
    return Settings(path=path, defaults=defaults_dict, accounts=tuple(accounts))
