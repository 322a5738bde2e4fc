"""``signet dev``: a local cluster for development and demos."""

from __future__ import annotations

import json
from pathlib import Path

import click

from signer.cli.common import EXIT_FAILURE, EXIT_UNAVAILABLE, fail

STATE_DIR = click.option(
    "--state-dir", type=click.Path(path_type=Path, file_okay=False), default=Path(".signet"),
    show_default=True, envvar="SIGNET_STATE_DIR",
    help="Where the cluster keeps its etcd data, HSM token, certificates and logs.",
)


@click.group()
def dev() -> None:
    """Run a real local cluster: etcd, a SoftHSM token, a dev CA and a signer."""


@dev.command()
@STATE_DIR
@click.option("--regions", type=click.IntRange(1, 5), default=1, show_default=True,
              help="Regions on this machine: each with its own etcd member, SoftHSM token and "
                   "signer (1: the single 'local' region; 3: eu-west, us-east, ap-south).")
@click.option("--signers", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Signer processes per region.")
def up(state_dir: Path, regions: int, signers: int) -> None:
    """Start the cluster (or reuse the one in STATE_DIR) and write cluster.json."""
    from signer.dev.cluster import DevCluster
    from signer.dev.etcd import EtcdLaunchError
    from signer.dev.processes import SignerLaunchError
    from signer.dev.softhsm import SoftHsmSetupError

    try:
        cluster = DevCluster(state_dir.resolve()).up(regions=regions, signers=signers)
    except (EtcdLaunchError, SignerLaunchError, SoftHsmSetupError) as error:
        fail(str(error), EXIT_FAILURE)
    click.echo(f"cluster ready; use --cluster {cluster.path} or SIGNET_CLUSTER={cluster.path}")


@dev.command()
@STATE_DIR
def down(state_dir: Path) -> None:
    """Stop everything `up` started in STATE_DIR (data is kept)."""
    from signer.dev.cluster import DevCluster

    stopped = DevCluster(state_dir.resolve()).down()
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@dev.command()
@STATE_DIR
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text")
def status(state_dir: Path, output: str) -> None:
    """Report the health of the signer and etcd members. Exits 7 when anything is down."""
    from signer.cluster import ClusterFileError
    from signer.dev.cluster import DevCluster

    try:
        report = DevCluster(state_dir.resolve()).status()
    except ClusterFileError as error:
        fail(str(error), EXIT_UNAVAILABLE)
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        for endpoint, state in report["signers"].items():  # type: ignore[attr-defined]
            click.echo(f"signer {endpoint}: {state}")
        for endpoint, state in report["etcd"].items():  # type: ignore[attr-defined]
            click.echo(f"etcd   {endpoint}: {state}")
    if not report["healthy"]:
        raise SystemExit(EXIT_UNAVAILABLE)
