"""The per-account settings file: defaults, overrides, and errors that name the line."""

from __future__ import annotations

import pytest

from optimizer_assets.settings import DEFAULT_SETTINGS_PATH, SettingsError, load_settings


def write(tmp_path, text):
    path = tmp_path / "accounts.yaml"
    path.write_text(text)
    return path


def test_checked_in_file_loads():
    settings = load_settings(DEFAULT_SETTINGS_PATH)
    assert settings.defaults["currency"] == "USD"


def test_account_overrides_defaults(tmp_path):
    path = write(
        tmp_path,
        "defaults:\n  currency: EUR\n  default_country: de\n"
        "accounts:\n  - account_id: '123'\n    hubspot_pipeline_id: '9'\n    currency: GBP\n",
    )
    settings = load_settings(path)
    assert settings.for_account("123").currency == "GBP"
    assert settings.for_account("456").currency == "EUR"  # discovered account gets defaults
    assert settings.for_account("456").default_country == "de"
    assert settings.pipeline_accounts() == {"9": "123"}


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("defaults:\n  currency: US\n", 2, "ISO 4217"),
        ("accounts:\n  - account_id: '1'\n  - account_id: '2'\n    mode: turbo\n", 4, "mode"),
        ("accounts:\n  - account_id: 'act_1'\n", 2, "account_id"),
        ("accounts:\n  - account_id: '1'\n  - account_id: '1'\n", 3, "duplicate"),
        ("defaults: [\n", 2, "YAML"),
        ("defaults:\n  timezone: Mars/Base\n", 2, "timezone"),
        ("accounts:\n  - account_id: '1'\n    colour: red\n", 3, "colour"),
    ],
)
def test_bad_file_names_line_and_reason(tmp_path, text, line, reason):
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert reason in message


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")


def test_checked_in_accounts_describe_the_default_sandbox():
    from optimizer_assets.sandbox.settings_file import account_entries
    from optimizer_assets.sandbox.world import World, WorldConfig

    settings = load_settings(DEFAULT_SETTINGS_PATH)
    expected = account_entries(World(WorldConfig()).accounts())
    assert [a.account_id for a in settings.accounts] == [e["account_id"] for e in expected]
    assert settings.pipeline_accounts() == {
        e["hubspot_pipeline_id"]: e["account_id"] for e in expected
    }
