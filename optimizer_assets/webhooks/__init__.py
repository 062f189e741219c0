"""HTTP endpoints that receive pushes from the outside (HubSpot webhooks); no Dagster here."""
