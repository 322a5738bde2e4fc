"""``signet drill failover``: take a region down under load and prove RPO 0 (signer.drill)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from signer.cli.common import EXIT_FAILURE, EXIT_PRECONDITION, fail


@click.group()
def drill() -> None:
    """Failover drills on a development cluster (docs/adr/0010-multi-region.md)."""


@drill.command()
@click.option("--cluster", "cluster_path", type=click.Path(path_type=Path, dir_okay=False),
              envvar="SIGNET_CLUSTER", default=Path(".signet/cluster.json"), show_default=True,
              help="cluster.json of a cluster started with 'signet dev up --regions N'.")
@click.option("--region", required=True, help="The region to take down.")
@click.option("--mode", type=click.Choice(["kill", "pause", "partition"]), required=True,
              help="kill: SIGKILL its signers and etcd member; pause: SIGSTOP them; "
                   "partition: cut it off from the etcd quorum.")
@click.option("--load", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Concurrent clients, each preferring another home region.")
@click.option("--duration", type=click.FloatRange(3), default=20.0, show_default=True,
              help="Seconds of load; the region is down from 25 % to 65 % of it.")
@click.option("--key", default="drill", show_default=True,
              help="Multi-region key to sign with (created if missing and allowed).")
@click.option("--revoke", is_flag=True,
              help="Also revoke a second key's version while the region is down, and check "
                   "the fence held in every region.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="Folder for the report (default: STATE/drills/<time>).")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text")
def failover(  # noqa: PLR0917 - click passes every option as a parameter
    cluster_path: Path, region: str, mode: str, load: int, duration: float, key: str,
    revoke: bool, report_dir: Path | None, output: str,
) -> None:
    """Run steady signing load, take REGION down, measure the outage, check that every
    acknowledged signature was audited exactly once and verifies, bring the region back and
    write a signed report. Exit 0 when every check passed, 6 when one failed."""
    from signer.drill import DrillError, DrillSettings, run_failover_drill

    quiet = output == "json"
    try:
        report = run_failover_drill(
            DrillSettings(cluster_path, region, mode, load=load, duration=duration, key=key,
                          report_dir=report_dir, revoke_during=revoke),
            log=(lambda _: None) if quiet else click.echo)
    except DrillError as error:
        fail(str(error), EXIT_FAILURE)
    if quiet:
        data = report.to_dict()
        data.pop("outcomes")
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    if not report.passed:
        raise SystemExit(EXIT_PRECONDITION)
