"""Per-identity limits and audited denials, in one server interceptor (docs/adr/0012).

Every unary RPC except health checks and reflection passes through :class:`GuardInterceptor`:

- **Rate**: a token bucket per caller identity (``per_identity_rps`` refill,
  ``per_identity_burst`` capacity). An empty bucket answers ``RESOURCE_EXHAUSTED`` saying which
  limit and after how many milliseconds a token is back (also in the trailing metadata
  ``signet-retry-after-ms``).
- **Concurrency**: at most ``per_identity_concurrency`` calls of one identity in flight.
- **Draining**: once a stopping signer calls :meth:`GuardInterceptor.drain`, new calls are
  answered ``UNAVAILABLE`` (nothing was done: retry elsewhere) while the calls in flight finish;
  ``drain`` returns when none is left, so the server's shutdown no longer cuts long calls (an
  RSA batch) off after gRPC's grace period.
- **Denials are audited**: every ``PERMISSION_DENIED`` / ``UNAUTHENTICATED`` the servicers
  answer becomes an audit ``security`` entry (identity, method, key, reason; never a payload).
  A token bucket per identity and one for the whole process bound how many are written, so a
  flood of denials cannot fill the audit disk; what is dropped is counted and reported in the
  next entry written for that identity (``dropped``) and in the metric
  ``signet_security_events_total{kind="denial_dropped"}``.

The books are kept by ``signer.limits``: in this process, or in a table that every worker of
the signer shares. Identity comes from the client certificate exactly as the servicers read it
(``signer.identity``, cached per certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import grpc

from kms.errors import KmsError
from signer.identity import identity_from_pem
from signer.limits import (
    MAX_TRACKED_IDENTITIES,
    Buckets,
    Limiter,
    LimitsConfig,
    LocalLimits,
    Refusal,
    TokenBucket,
)

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
DENIAL_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
UNIDENTIFIED = "unidentified"  # callers whose certificate carries no usable URI SAN
MAX_HOLD_SECONDS = 0.25  # the longest a refusal is held back (GuardInterceptor._hold)
MIN_HOLD_SECONDS = 0.001
MAX_HELD = 1024


class EventRecorder(Protocol):
    """The part of the audit log (``kms.ports.AuditRecorder``) that denials need."""

    async def record_event(self, kind: str, fields: Mapping[str, Any]) -> int: ...


class DenialAuditor:
    """Writes ``security`` audit entries for denials, within a bounded rate."""

    def __init__(self, config: LimitsConfig, *, clock: Callable[[], float] = time.monotonic,
                 count_event: Callable[[str], None] | None = None) -> None:
        self._per_identity = Buckets(config.denial_audit_per_identity_rps,
                                     config.denial_audit_burst)
        self._total = TokenBucket(config.denial_audit_total_rps,
                                  max(config.denial_audit_burst, 1), clock())
        self._clock = clock
        self._count = count_event
        self._dropped: dict[str, int] = {}
        self._audit: EventRecorder | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.written = 0
        self.dropped = 0

    def attach(self, audit: EventRecorder) -> None:
        """Start writing entries (denials before the audit log is open are logged only)."""
        self._audit = audit

    def denied(self, *, identity: str, method: str, key: str, code: grpc.StatusCode,
               reason: str) -> None:
        """Record one denial without delaying the answer to the caller."""
        now = self._clock()
        if self._audit is None or self._per_identity.take(identity, now) or self._total.take(now):
            self._dropped[identity] = self._dropped.get(identity, 0) + 1
            if len(self._dropped) > MAX_TRACKED_IDENTITIES:
                self._dropped.pop(next(iter(self._dropped)))
            self.dropped += 1
            if self._count is not None:
                self._count("denial_dropped")
            return
        fields: dict[str, Any] = {
            "event": "denied", "identity": identity, "method": method, "key": key,
            "code": code.name, "reason": reason[:500],
        }
        dropped = self._dropped.pop(identity, 0)
        if dropped:
            fields["dropped"] = dropped
        task = asyncio.create_task(self._write(self._audit, fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, audit: EventRecorder, fields: dict[str, Any]) -> None:
        try:
            await audit.record_event("security", fields)
        except KmsError as error:  # the audit store is down: the denial stands regardless
            log.warning("could not audit a denial for %s: %s", fields["identity"],
                        error.diagnostics())
            return
        self.written += 1
        if self._count is not None:
            self._count("denied")

    async def drain(self) -> None:
        """Wait for entries being written (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _identity(context: grpc.aio.ServicerContext[Any, Any], insecure: bool) -> str:
    if insecure:
        return "insecure://anonymous"
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return UNIDENTIFIED
    try:
        return identity_from_pem(next(iter(pems)))
    except KmsError:
        return UNIDENTIFIED


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Rate and concurrency limits per identity, and audited denials (module docstring)."""

    def __init__(self, config: LimitsConfig, auditor: DenialAuditor, *, insecure: bool,
                 clock: Callable[[], float] = time.monotonic,
                 limiter: Limiter | None = None) -> None:
        """``limiter``: the books shared by every worker of the signer
        (``signer.limits.SharedLimits``); None keeps them in this process."""
        self._auditor = auditor
        self._insecure = insecure
        self._clock = clock
        self._limits: Limiter = limiter if limiter is not None else LocalLimits(config)
        self._total = 0  # calls in flight, every identity
        self._held: dict[str, int] = {}  # refusals being held back, by identity (see _hold)
        self._held_total = 0
        self._draining = False
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.rejected = {"rate": 0, "concurrency": 0, "draining": 0}

    async def drain(self, timeout: float) -> int:
        """Refuse new calls from now on and wait, at most ``timeout`` seconds, until the calls
        in flight have finished. Returns how many were still running at the timeout."""
        self._draining = True
        self._stopping.set()  # held refusals are answered now
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        return self._total

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if (handler is None or handler.unary_unary is None
                or full_method.startswith(EXEMPT_PREFIXES)):
            return handler
        method = full_method.rsplit("/", 1)[-1]
        inner: Any = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self._draining:
                self.rejected["draining"] += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, (
                    "this signer is stopping and takes no new calls; nothing was done, retry "
                    "(another signer or region answers)"))
            identity = _identity(context, self._insecure)
            refusal = self._limits.admit(identity, self._clock())
            if refusal is not None:
                await self._refuse(context, identity, refusal)
            self._total += 1
            self._idle.clear()
            try:
                return await inner(request, context)
            except BaseException:
                code = context.code() if hasattr(context, "code") else None
                if code in DENIAL_CODES:
                    key = getattr(request, "key", "") or getattr(request, "name", "")
                    details = context.details() if hasattr(context, "details") else ""
                    self._auditor.denied(
                        identity=identity, method=method, key=key if isinstance(key, str) else "",
                        code=code, reason=details if isinstance(details, str) else "")
                raise
            finally:
                self._limits.release(identity)
                self._total -= 1
                if not self._total:
                    self._idle.set()

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any], identity: str,
                      refusal: Refusal) -> None:
        limits = refusal.limits
        self.rejected[refusal.limit] += 1
        wait = refusal.retry_after - await self._hold(context, identity, refusal)
        if refusal.limit == "concurrency":
            millis = max(0, int(wait * 1000))
            message = (
                f"concurrency limit reached for {identity}: at most {limits.concurrency} calls "
                "in flight; retry when one of your calls has finished"
                + (f" (about {millis} ms)" if millis else ""))
        else:
            millis = max(1, int(wait * 1000) + 1)
            message = (
                f"rate limit reached for {identity}: {limits.rps:g} requests/s "
                f"(burst {limits.burst}); retry after {millis} ms")
        context.set_trailing_metadata((("signet-retry-after-ms", str(millis)),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    async def _hold(self, context: grpc.aio.ServicerContext[Any, Any], identity: str,
                    refusal: Refusal) -> float:
        """Answer a refusal only when its caller could usefully retry, so that a client that
        retries at once (a build fleet in a loop) is paced by the limit instead of spending
        the signer's CPU on refusals as fast as it can send them (each costs ~0.4 ms of gRPC
        alone; docs/adr/0012). The hold is the retry-after plus one refill interval for
        each refusal of the same identity already held, so its callers together come back
        at about its rate; at most ``MAX_HOLD_SECONDS`` and half the caller's time left. At
        most ``MAX_HELD`` refusals are held at once per process, and a draining signer
        answers them at once. Returns the seconds held."""
        hold = self.hold_seconds(identity, refusal, context.time_remaining())
        if not hold:
            return 0.0
        started = self._clock()
        self._held[identity] = self._held.get(identity, 0) + 1
        self._held_total += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(hold):
                    await self._stopping.wait()
        finally:
            self._held_total -= 1
            left = self._held[identity] - 1
            if left:
                self._held[identity] = left
            else:
                del self._held[identity]
        return self._clock() - started

    def hold_seconds(self, identity: str, refusal: Refusal, remaining: float | None) -> float:
        """How long ``_hold`` holds this refusal now: 0 for none. ``remaining``: the caller's
        time left (None without a deadline)."""
        rps = refusal.limits.rps
        spacing = 1.0 / rps if rps > 0 else 0.0
        hold = min(refusal.retry_after + self._held.get(identity, 0) * spacing,
                   MAX_HOLD_SECONDS,
                   remaining / 2 if remaining is not None else MAX_HOLD_SECONDS)
        if hold < MIN_HOLD_SECONDS or self._held_total >= MAX_HELD or self._draining:
            return 0.0
        return hold
