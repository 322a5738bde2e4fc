"""What every servicer shares: the caller's identity and the error-to-status mapping."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

from kms.errors import KmsError, Unavailable
from kms.signing import Caller
from signer.errors import status_for
from signer.identity import caller_from_context
from signer.telemetry import annotate_caller

log = logging.getLogger(__name__)

T = TypeVar("T")
Servicer = TypeVar("Servicer", bound="ServicerBase")
Request = TypeVar("Request")
Response = TypeVar("Response")


class Deferred(Generic[T]):
    """A back end that is set once start-up finishes. Until then callers get UNAVAILABLE, so
    the port can answer health checks (NOT_SERVING) while the HSM and etcd are opened."""

    def __init__(self) -> None:
        self._value: T | None = None

    def set(self, value: T) -> None:
        self._value = value

    def get(self) -> T:
        if self._value is None:
            raise Unavailable(
                "this signer is still starting (HSM login and key state); retry shortly"
            )
        return self._value


class ServicerBase:
    def __init__(self, *, insecure: bool) -> None:
        self._insecure = insecure

    def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        caller = caller_from_context(context, insecure=self._insecure)
        annotate_caller(caller.identity)
        return caller


def rpc(
    method: Callable[[Servicer, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]],
) -> Callable[[Servicer, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]:
    """Answer ``KmsError`` with its gRPC status and message; anything unexpected with INTERNAL
    and a log line, never a traceback to the caller."""

    @functools.wraps(method)
    async def handler(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        try:
            return await method(self, request, context)
        except KmsError as error:
            await context.abort(status_for(error), error.diagnostics())
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal error; the signer log has the details"
            )
        raise AssertionError("unreachable: context.abort raises")

    return handler
