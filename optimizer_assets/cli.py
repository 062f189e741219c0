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
def sandbox_serve(host, port, seed, accounts, ads_per_account, speed) -> None:
    """Serve the sandbox's HubSpot, Graph API and CAPI endpoints on HOST:PORT."""
    from optimizer_assets.sandbox.server import serve
    from optimizer_assets.sandbox.world import WorldConfig

    overrides = {"seed": seed}
    if accounts is not None:
        overrides["accounts"] = accounts
    if ads_per_account is not None:
        overrides["ads_per_account"] = ads_per_account
    serve(host=host, port=port, config=WorldConfig(**overrides), speed=speed)


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
@click.option("--speed", default=3600.0, show_default=True, type=float)
@click.option("--seed", default=7, show_default=True, type=int)
def ui(port: int, sandbox_port: int, speed: float, seed: int) -> None:
    """Start the sandbox (real-time speed) and `dagster dev` with its daemon on 127.0.0.1."""
    import os
    import subprocess
    import sys

    from optimizer_assets.instance import REPO_ROOT, prepare_dagster_home

    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(prepare_dagster_home())
    env.setdefault("OPTIMIZER_MODE", "sandbox")
    env.setdefault("OPTIMIZER_SANDBOX_URL", f"http://127.0.0.1:{sandbox_port}")
    bin_dir = os.path.dirname(sys.executable)
    sandbox_cmd = [
        os.path.join(bin_dir, "optimizer"),
        "sandbox",
        "serve",
        "--port",
        str(sandbox_port),
        "--seed",
        str(seed),
        "--speed",
        str(speed),
    ]
    dagster_cmd = [
        os.path.join(bin_dir, "dagster"),
        "dev",
        "-w",
        str(REPO_ROOT / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    click.echo(
        f"sandbox on http://127.0.0.1:{sandbox_port} (speed {speed:g}x), "
        f"Dagster UI on http://127.0.0.1:{port}, DAGSTER_HOME={env['DAGSTER_HOME']}"
    )
    processes = [subprocess.Popen(sandbox_cmd, env=env, cwd=REPO_ROOT)]
    try:
        processes.append(subprocess.Popen(dagster_cmd, env=env, cwd=REPO_ROOT))
        processes[-1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


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
    "--warehouse", default=None, help="DuckDB file; default $OPTIMIZER_WAREHOUSE or data/."
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
