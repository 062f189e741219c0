"""The `optimizer` console command."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """Meta ads <-> HubSpot optimizer: sandbox, demo and UI."""


@main.group()
def sandbox() -> None:
    """The simulated ad world (loopback HubSpot + Meta with ground truth)."""


@sandbox.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--accounts", default=None, type=int, help="Number of ad accounts (default 3).")
@click.option("--ads-per-account", default=None, type=int, help="Ads per account.")
@click.option(
    "--speed",
    default=None,
    type=float,
    help="Simulated seconds per real second (3600 = one simulated hour per second). "
    "Without it, time moves only on POST /_sandbox/advance.",
)
@click.option(
    "--webhook-url",
    default=None,
    help="Also play HubSpot's webhooks: POST signed deal changes to this URL "
    "(signed with $HUBSPOT_CLIENT_SECRET, the receiver's secret).",
)
def sandbox_serve(host, port, seed, accounts, ads_per_account, speed, webhook_url) -> None:
    """Serve the sandbox's HubSpot, Graph API and CAPI endpoints on HOST:PORT."""
    import os

    from optimizer_assets.sandbox.server import serve
    from optimizer_assets.sandbox.world import WorldConfig

    overrides = {"seed": seed}
    if accounts is not None:
        overrides["accounts"] = accounts
    if ads_per_account is not None:
        overrides["ads_per_account"] = ads_per_account
    secret = os.environ.get("HUBSPOT_CLIENT_SECRET", "")
    if webhook_url and not secret:
        raise click.ClickException("--webhook-url needs HUBSPOT_CLIENT_SECRET in the environment")
    serve(
        host=host,
        port=port,
        config=WorldConfig(**overrides),
        speed=speed,
        webhook_url=webhook_url,
        webhook_secret=secret or None,
    )


@sandbox.command("accounts")
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--accounts", default=None, type=int, help="Number of ad accounts (default 3).")
def sandbox_accounts(seed: int, accounts: int | None) -> None:
    """Print the data/accounts.yaml entries that describe a sandbox world's accounts."""
    from optimizer_assets.sandbox.settings_file import settings_yaml
    from optimizer_assets.sandbox.world import World, WorldConfig

    config = WorldConfig(seed=seed, **({"accounts": accounts} if accounts else {}))
    click.echo(settings_yaml(World(config).accounts()), nl=False)


@main.command()
@click.option("--days", default=30, show_default=True, type=int, help="Simulated days to run.")
@click.option("--seed", default=7, show_default=True, type=int)
def demo(days: int, seed: int) -> None:
    """Run the loop on the embedded sandbox for DAYS simulated days and print the results."""
    from optimizer_assets.demo import run_demo

    run_demo(days=days, seed=seed)


@main.command()
@click.option("--port", default=3000, show_default=True, type=int, help="Dagster UI port.")
@click.option("--sandbox-port", default=8765, show_default=True, type=int)
@click.option("--webhook-port", default=8766, show_default=True, type=int, help="Receiver port.")
@click.option("--speed", default=3600.0, show_default=True, type=float)
@click.option("--seed", default=7, show_default=True, type=int)
def ui(port: int, sandbox_port: int, webhook_port: int, speed: float, seed: int) -> None:
    """Start the sandbox (real-time clock, playing HubSpot's webhooks), the webhook receiver and
    `dagster dev` with its daemon on 127.0.0.1; the sensor runs the loop on every deal change."""
    import contextlib
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import time

    from optimizer_assets.instance import REPO_ROOT, prepare_dagster_home

    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(prepare_dagster_home())
    env.setdefault("OPTIMIZER_MODE", "sandbox")
    env.setdefault("OPTIMIZER_SANDBOX_URL", f"http://127.0.0.1:{sandbox_port}")
    # the sandbox's world starts afresh each session: so do its warehouse and the receiver's
    # landing file (its own DuckDB file: the receiver writes whenever a webhook comes in)
    for name, file in (
        ("OPTIMIZER_WAREHOUSE", "ui.duckdb"),
        ("OPTIMIZER_WEBHOOK_WAREHOUSE", "ui-webhooks.duckdb"),
    ):
        if not env.get(name):
            path = REPO_ROOT / "data" / file
            for stale in (path, path.with_name(path.name + ".wal")):
                stale.unlink(missing_ok=True)
            env[name] = str(path)
    # a sandbox day passes in 24 s at 3600x: re-pull the last 3 days of insights every minute
    env.setdefault("OPTIMIZER_INSIGHTS_REPULL_CRON", "* * * * *")
    # the sandbox signs its webhooks with this session's secret; the receiver verifies them
    env["HUBSPOT_CLIENT_SECRET"] = secrets.token_urlsafe(32)
    webhook_url = f"http://127.0.0.1:{webhook_port}/webhooks/hubspot"
    optimizer = os.path.join(os.path.dirname(sys.executable), "optimizer")
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    commands = [
        [optimizer, "webhook", "serve", "--host", "127.0.0.1", "--port", str(webhook_port)]
        + ["--warehouse", env["OPTIMIZER_WEBHOOK_WAREHOUSE"]],
        [
            optimizer,
            "sandbox",
            "serve",
            "--port",
            str(sandbox_port),
            "--seed",
            str(seed),
            "--speed",
            str(speed),
            "--webhook-url",
            webhook_url,
        ],
        [dagster, "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1"]
        + ["-p", str(port)],
    ]
    click.echo(
        f"sandbox on http://127.0.0.1:{sandbox_port} (speed {speed:g}x) posting webhooks to "
        f"{webhook_url}; Dagster UI on http://127.0.0.1:{port}; "
        f"warehouse {env['OPTIMIZER_WAREHOUSE']}; DAGSTER_HOME={env['DAGSTER_HOME']}"
    )
    processes: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` cleans up like Ctrl-C
    try:
        for command in commands:
            # own process groups: whatever a child starts is stopped with it below
            child = subprocess.Popen(command, env=env, cwd=REPO_ROOT, start_new_session=True)
            processes.append(child)
            time.sleep(1.0)  # the receiver listens before the sandbox posts to it
        processes[-1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):  # dagster dev shuts down its children on SIGINT
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@main.group()
def webhook() -> None:
    """The HubSpot webhook receiver: signed deal changes -> warehouse landing table."""


@webhook.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8766, show_default=True, type=int)
@click.option(
    "--public-url",
    default=None,
    help="Public base URL HubSpot posts to, behind a proxy [$OPTIMIZER_WEBHOOK_PUBLIC_URL].",
)
@click.option(
    "--warehouse",
    default=None,
    help=(
        "DuckDB landing file; default $OPTIMIZER_WEBHOOK_WAREHOUSE, else $OPTIMIZER_WAREHOUSE, "
        "else data/."
    ),
)
def webhook_serve(host: str, port: int, public_url: str | None, warehouse: str | None) -> None:
    """Receive HubSpot webhooks on HOST:PORT/webhooks/hubspot (secret: $HUBSPOT_CLIENT_SECRET)."""
    from optimizer_assets.webhooks.receiver import ConfigError, ReceiverSettings, serve

    try:
        settings = ReceiverSettings.from_env(public_base_url=public_url, warehouse_path=warehouse)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    serve(host=host, port=port, settings=settings)


if __name__ == "__main__":
    main()
