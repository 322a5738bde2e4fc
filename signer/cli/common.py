"""What every ``signet`` command shares: cluster and output options, errors and exit codes."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import grpc

from kms.errors import KmsError
from signer.client import SignetClient
from signer.cluster import ClusterFile, ClusterFileError
from signer.errors import SignetError, status_for

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes, documented in docs/cli.md. Click itself exits 2 for usage errors.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INVALID = 3
EXIT_NOT_FOUND = 4
EXIT_DENIED = 5
EXIT_PRECONDITION = 6
EXIT_UNAVAILABLE = 7

_EXIT_FOR_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_INVALID,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_PRECONDITION,
    grpc.StatusCode.ABORTED: EXIT_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_UNAVAILABLE,
}


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one clear line to stderr and exit; never a traceback."""
    click.echo(f"signet: error: {message}", err=True)
    sys.exit(code)


def handle_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SignetError as error:
            fail(f"{error.message} ({error.code.name})",
                 _EXIT_FOR_STATUS.get(error.code, EXIT_FAILURE))
        except KmsError as error:
            fail(error.diagnostics(), _EXIT_FOR_STATUS.get(status_for(error), EXIT_FAILURE))
        except ClusterFileError as error:
            fail(str(error), EXIT_USAGE)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Context:
    cluster_path: Path
    output: str
    identity: str | None
    region: str | None

    @property
    def json(self) -> bool:
        return self.output == "json"

    def cluster(self) -> ClusterFile:
        return ClusterFile.load(self.cluster_path)

    def client(self, default_identity: str) -> SignetClient:
        return SignetClient.from_cluster(
            self.cluster(), self.identity or default_identity, region=self.region
        )

    def emit(self, data: Any, human: str) -> None:
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            click.echo(human)


def cluster_options(command: F) -> F:
    """Add --cluster, --output, --identity and --region, and pass a ``Context`` as ``ctx``."""

    @click.option(
        "--cluster", "cluster_path", type=click.Path(path_type=Path),
        envvar="SIGNET_CLUSTER", default=Path(".signet/cluster.json"), show_default=True,
        help="cluster.json naming the endpoints and credentials (env SIGNET_CLUSTER).",
    )
    @click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                  show_default=True, help="Output format.")
    @click.option("--identity", default=None,
                  help="Identity from cluster.json to call with (default depends on command).")
    @click.option("--region", default=None, help="Preferred region (default: the home region).")
    @functools.wraps(command)
    def wrapper(cluster_path: Path, output: str, identity: str | None, region: str | None,
                **kwargs: Any) -> Any:
        return command(ctx=Context(cluster_path, output, identity, region), **kwargs)

    return wrapper  # type: ignore[return-value]
