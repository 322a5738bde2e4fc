"""The read-only operator dashboard at ``/dashboard`` on the signer's ``/tuf/`` HTTPS port.

It shows what an operator checks first: regions and signer health, keys and their versions,
the trust bundle, pending ceremonies, this signer's recent audit entries, drill reports,
admission decisions, and charts of signatures per key, sign latency and key versions over
time. ``/dashboard/api/summary.json`` returns the same data as JSON.

Three layers, so the parts that matter can be tested without I/O:

- **collect** (:func:`collect_summary`): reads the signer's state into one JSON-able summary
  (``dict``). Each section is read on its own with a time limit, so etcd trouble shows as a
  note in that section instead of a blank page.
- **render** (:func:`render_page`, :func:`render_login`): pure functions from a summary to
  HTML. Every value that came from outside (key names, identities, request ids, report
  fields) goes through :func:`_e` (HTML escaping); pages carry no JavaScript and load nothing
  from elsewhere (the CSP header forbids it); charts are inline SVG.
- **serve** (:class:`Dashboard`): token checks and routing for ``signer.http``.

Access is a read-only bearer token (``dashboard.token_file``): ``Authorization: Bearer …``
for tools, and for browsers a login form (or ``?token=`` once) that sets an HttpOnly, Secure,
SameSite=Strict cookie holding an HMAC of the token (not the token itself) and redirects.
Tokens are compared in constant time and never logged or written into a page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from kms.audit.log import ENTRIES_FILE
from kms.domain.ceremony import CustodianSet, Proposal, Status
from kms.errors import InvalidArgument, KmsError
from kms.state.etcd import EtcdKeyStateStore
from kms.state.view import KeyStateView
from kms.tuf.service import TrustBundleService
from signer.config import DashboardConfig
from signer.http import HttpRequest, HttpResponse

log = logging.getLogger(__name__)

ROOT = "/dashboard"
COOKIE_NAME = "signet_dashboard"
COOKIE_MAX_AGE = 12 * 3600
MIN_TOKEN_CHARS = 16
AUDIT_ROWS = 50
DRILL_REPORTS = 20
ADMISSION_ROWS = 50
REFRESH_SECONDS = 15
SECTION_TIMEOUT = 3.0
TAIL_BYTES = 256 * 1024  # how much of a JSONL file's end is read for its last rows
MAX_REPORT_BYTES = 256 * 1024
# default-src 'none': nothing is fetched from anywhere and no script runs; styles are inline.
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options: nosniff",
    "Referrer-Policy: no-referrer",
    "Cache-Control: no-store",
)
PAGES = {  # path -> (title, sections shown)
    ROOT: "Overview",
    f"{ROOT}/keys": "Keys",
    f"{ROOT}/audit": "Audit",
    f"{ROOT}/operations": "Operations",
}
AUDIT_FIELDS = ("index", "time", "kind", "identity", "key", "version", "request_id")
# What an audit entry did, for the kinds that are not signatures (never digests or payloads).
AUDIT_WHAT_FIELDS = ("action", "event")
STATE_COLOURS = {
    "ACTIVE": "#2e7d32", "RETIRED": "#757575", "DISABLED": "#f9a825",
    "DESTROY_SCHEDULED": "#ef6c00", "DESTROYED": "#424242", "REVOKED": "#c62828",
}

Summary = dict[str, Any]
ProposalListing = Callable[[], Awaitable[list[dict[str, Any]]]]


# -- token ---------------------------------------------------------------------------------


def load_token(path: Path) -> str:
    """The dashboard token from ``path`` (surrounding whitespace removed). Raises
    ``InvalidArgument`` when it cannot be read or is shorter than 16 characters (the error
    never contains the token)."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"cannot read the dashboard token file {path}: {error}") from None
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
        raise InvalidArgument(
            f"the dashboard token in {path} must be at least {MIN_TOKEN_CHARS} printable ASCII "
            "characters; generate one with 'openssl rand -hex 32'")
    return token


class TokenCheck:
    """Constant-time checks of the bearer token, the login form and the session cookie."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        # The cookie holds a MAC of the token, so a leaked cookie does not reveal the token
        # that tools use as a bearer credential.
        self._cookie = hmac.new(self._token, b"signet-dashboard-cookie-v1",
                                hashlib.sha256).hexdigest().encode()

    def token_ok(self, given: str) -> bool:
        return hmac.compare_digest(self._token, given.encode("utf-8", "replace"))

    def cookie_ok(self, given: str) -> bool:
        return hmac.compare_digest(self._cookie, given.encode("utf-8", "replace"))

    def set_cookie(self) -> str:
        return (f"Set-Cookie: {COOKIE_NAME}={self._cookie.decode()}; Path={ROOT}; "
                f"Max-Age={COOKIE_MAX_AGE}; HttpOnly; Secure; SameSite=Strict")

    def authorized(self, request: HttpRequest) -> bool:
        """Whether the request carries the token as a bearer credential or the cookie."""
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credential and self.token_ok(credential.strip()):
            return True
        for part in request.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE_NAME and self.cookie_ok(value):
                return True
        return False


# -- collect -------------------------------------------------------------------------------


def tail_jsonl(path: Path, limit: int) -> list[dict[str, Any]]:
    """The last ``limit`` JSON objects of a JSON-lines file, oldest first. A missing file is
    empty; lines that are not JSON objects (a torn last line) are skipped."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if size > TAIL_BYTES:
        lines = lines[1:]  # the first line was cut by the seek
    rows = []
    for line in lines:
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                rows.append(value)
    return rows[-limit:]


def audit_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Only the fields the dashboard shows: never digests, payloads or anything else an
    entry may hold."""
    rows = []
    for entry in entries:
        row = {name: entry.get(name) for name in AUDIT_FIELDS}
        row["what"] = next((str(entry[n]) for n in AUDIT_WHAT_FIELDS if entry.get(n)), "")
        rows.append(row)
    return rows


def read_reports(directory: Path, limit: int = DRILL_REPORTS) -> list[dict[str, Any]]:
    """Drill reports: the newest ``limit`` ``*.json`` files in ``directory`` or one folder
    below (``signet drill`` writes ``drills/<time>/drill-report.json``; detached signatures
    ``*.sig.json`` are skipped), newest first, each as ``{"file", "modified", "fields"}``
    with its top-level scalar fields (nested data is left to the file). A file that is too
    large or not a JSON object is listed with an error."""
    try:
        found = [p for p in (*directory.glob("*.json"), *directory.glob("*/*.json"))
                 if not p.name.endswith(".sig.json")]
        files = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []
    reports = []
    for path in files[:limit]:
        report: dict[str, Any] = {"file": str(path.relative_to(directory)),
                                  "modified": path.stat().st_mtime, "fields": {}, "error": ""}
        try:
            report["fields"] = _report_fields(path)
        except (OSError, ValueError) as error:
            report["error"] = f"unreadable: {error}"
        reports.append(report)
    return reports


def _report_fields(path: Path) -> dict[str, Any]:
    """A report's top-level scalar fields; raises ``OSError`` or ``ValueError``."""
    if path.stat().st_size > MAX_REPORT_BYTES:
        raise ValueError(f"larger than {MAX_REPORT_BYTES} bytes")
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - reported as unreadable
    def scalar(value: Any) -> bool:
        return isinstance(value, str | int | float | bool) or value is None

    fields = {k: v for k, v in data.items() if scalar(v)}
    # One level of nesting (a drill's "settings": region, mode…), after the top-level ones.
    for name, value in data.items():
        if isinstance(value, dict):
            fields.update({f"{name}.{k}": v for k, v in value.items() if scalar(v)})
    return fields


def metric_summary(registry: CollectorRegistry) -> dict[str, Any]:
    """Signatures per key and outcome, and the sign latency histogram (summed over methods,
    as per-bucket counts), from this process's Prometheus registry."""
    signatures: dict[tuple[str, str], float] = {}
    cumulative: dict[float, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "signet_signatures_total":
                label = (sample.labels.get("key", ""), sample.labels.get("outcome", ""))
                signatures[label] = signatures.get(label, 0.0) + sample.value
            elif sample.name == "signet_sign_duration_seconds_bucket":
                le = float(sample.labels["le"])
                cumulative[le] = cumulative.get(le, 0.0) + sample.value
    buckets, below = [], 0.0
    for le in sorted(cumulative):
        buckets.append({"le": le, "count": int(cumulative[le] - below)})
        below = cumulative[le]
    return {
        "signatures": [{"key": k, "outcome": o, "count": int(v)}
                       for (k, o), v in sorted(signatures.items())],
        "sign_latency": buckets,
    }


def proposal_listing(store: EtcdKeyStateStore, clock: Callable[[], float]) -> ProposalListing:
    """Open ceremony proposals read straight from etcd (the dashboard has no caller identity
    to pass to ``kms.ceremony.Ceremonies.list``, which authorises administrators)."""
    layout = store.layout

    async def listing() -> list[dict[str, Any]]:
        custodians_read = await store.read_records([layout.custodians])
        proposals_read = await store.read_records(prefixes=[layout.proposals_dir])
        custodians = None
        if layout.custodians in custodians_read.records:
            custodians = CustodianSet.from_dict(
                json.loads(custodians_read.records[layout.custodians][0]))
        now = clock()
        rows = []
        for value, _ in proposals_read.records.values():
            proposal = Proposal.from_dict(json.loads(value))
            if proposal.status_at(now) is not Status.OPEN:
                continue
            rows.append({
                "id": proposal.id, "action": proposal.action.value,
                "description": proposal.body.describe(), "proposer": proposal.body.proposer,
                "created_at": proposal.body.created_at, "expires_at": proposal.body.expires_at,
                "approvals": (len(proposal.counted(custodians)) if custodians
                              else len(proposal.approvals)),
                "required": proposal.required(custodians) if custodians else None,
            })
        return sorted(rows, key=lambda r: (r["created_at"], r["id"]))

    return listing


def key_rows(view: KeyStateView) -> list[dict[str, Any]]:
    rows = []
    for versioned in view.all_keys():
        key = versioned.key
        rows.append({
            "name": key.name, "algorithm": key.algorithm.short_name,
            "replication": key.replication.value, "primary_version": key.primary_version,
            "min_sign_version": key.min_sign_version, "created_at": key.created_at,
            "rotation_period_seconds": key.rotation_period_seconds,
            "mod_revision": versioned.mod_revision,
            "versions": [{
                "number": v.number, "state": v.state.value, "revoked": v.revoked,
                "primary": v.number == key.primary_version, "key_id": v.key_id,
                "created_at": v.created_at, "state_changed_at": v.state_changed_at,
                "revoked_at": v.revoked_at,
            } for v in key.versions],
        })
    return rows


@dataclass
class DashboardSources:
    """Where the dashboard reads from; all of it belongs to the signer process serving it."""

    region: str
    signer_id: str
    view: KeyStateView
    store: EtcdKeyStateStore
    audit_directory: Path
    audit_log_id: str
    trust: Callable[[], TrustBundleService]  # raises Unavailable until trust is up
    registry: CollectorRegistry
    ceremonies: ProposalListing | None = None  # None: this build has no ceremonies
    reports_dir: Path | None = None
    admission_log: Path | None = None
    clock: Callable[[], float] = time.time


async def _section(name: str, read: Callable[[], Awaitable[Any]]) -> tuple[Any, str]:
    """``(value, "")``, or ``(None, why)`` when the read failed or took too long."""
    try:
        async with asyncio.timeout(SECTION_TIMEOUT):
            return await read(), ""
    except TimeoutError:
        return None, f"{name}: no answer within {SECTION_TIMEOUT:g} s"
    except KmsError as error:
        return None, f"{name}: {error.diagnostics()}"
    except (ValueError, KeyError, TypeError) as error:  # a malformed record in etcd
        return None, f"{name}: malformed record ({error})"


async def collect_summary(sources: DashboardSources) -> Summary:
    """Everything the pages show, as JSON-able data. Never raises for a section that cannot
    be read: its ``error`` says why."""
    now = sources.clock()
    view = sources.view

    async def signers() -> dict[str, Any]:
        registrations = await sources.store.signer_registrations()
        return {"etcd_revision": registrations.revision, "applied": registrations.applied}

    async def bundle() -> dict[str, Any] | None:
        publication = await sources.trust().publication()
        return None if publication is None else publication.to_dict()

    async def audit() -> list[dict[str, Any]]:
        return audit_rows(await asyncio.to_thread(
            tail_jsonl, sources.audit_directory / ENTRIES_FILE, AUDIT_ROWS))

    registered, signers_error = await _section("signer registrations", signers)
    published, bundle_error = await _section("trust bundle", bundle)
    entries, audit_error = await _section("audit log", audit)
    proposals, ceremonies_error = (None, "")
    if sources.ceremonies is not None:
        proposals, ceremonies_error = await _section("ceremonies", sources.ceremonies)

    signer_rows = []
    if registered is not None:
        for signer_id, applied in sorted(registered["applied"].items()):
            signer_rows.append({
                "signer_id": signer_id, "region": signer_id.partition("/")[0],
                "applied_revision": applied, "behind": max(0, view.revision - applied),
                "this": signer_id == sources.signer_id,
            })
    regions: dict[str, dict[str, Any]] = {}
    for row in signer_rows:
        region = regions.setdefault(row["region"], {"name": row["region"], "signers": 0,
                                                    "behind": 0})
        region["signers"] += 1
        region["behind"] += 1 if row["behind"] else 0
    return {
        "format": "signet-dashboard/v1",
        "generated_at": now,
        "this_signer": {
            "signer_id": sources.signer_id, "region": sources.region,
            "lease_id": view.lease_id, "current": view.current,
            "key_state_revision": view.revision,
        },
        "etcd_revision": None if registered is None else registered["etcd_revision"],
        "regions": sorted(regions.values(), key=lambda r: r["name"]),
        "signers": signer_rows,
        "signers_error": signers_error,
        "keys": key_rows(view),
        "bundle": published,
        "bundle_error": bundle_error,
        "ceremonies": {"available": sources.ceremonies is not None,
                       "proposals": proposals or [], "error": ceremonies_error},
        "audit": {"log_id": sources.audit_log_id, "entries": entries or [],
                  "error": audit_error},
        "drills": {"configured": sources.reports_dir is not None,
                   "reports": [] if sources.reports_dir is None else await asyncio.to_thread(
                       read_reports, sources.reports_dir)},
        "admission": {"configured": sources.admission_log is not None,
                      "decisions": [] if sources.admission_log is None else
                      await asyncio.to_thread(tail_jsonl, sources.admission_log,
                                              ADMISSION_ROWS)},
        "metrics": metric_summary(sources.registry),
    }


# -- render --------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """HTML-escape anything shown in a page (quotes too, so it is safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _time(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "—"
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    """``rows`` are already-escaped HTML cells."""
    if not rows:
        return f'<p class="note">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _badge(text: str, colour: str) -> str:
    return f'<span class="badge" style="background:{colour}">{_e(text)}</span>'


def _error(text: str) -> str:
    return f'<p class="error">{_e(text)}</p>' if text else ""


def bar_chart(title: str, bars: Sequence[tuple[str, float]], *, colour: str = "#1565c0",
              unit: str = "") -> str:
    """A horizontal bar chart as inline SVG; labels are escaped."""
    if not bars:
        return f'<p class="note">{_e(title)}: no data yet.</p>'
    top = max(value for _, value in bars) or 1.0
    row, label_w, bar_w = 24, 180, 360
    height = row * len(bars) + 30
    parts = [f'<svg role="img" aria-label="{_e(title)}" width="{label_w + bar_w + 80}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="0" y="16" class="ct">{_e(title)}</text>']
    for i, (label, value) in enumerate(bars):
        y = 28 + i * row
        width = max(1.0, bar_w * value / top)
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">'
                     f"{_e(label)}</text>")
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="16" '
                     f'fill="{colour}"/>')
        parts.append(f'<text x="{label_w + width + 6:.1f}" y="{y + 15}">'
                     f"{_e(f'{value:g}{unit}')}</text>")
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(title: str, buckets: Sequence[Mapping[str, Any]]) -> str:
    """Latency buckets (``le`` seconds, per-bucket ``count``) as vertical bars in SVG."""
    if not any(b["count"] for b in buckets):
        return f'<p class="note">{_e(title)}: no signatures in this process yet.</p>'
    top = max(b["count"] for b in buckets)
    col, chart_h, top_y = 54, 140, 44
    width = col * len(buckets) + 20
    parts = [f'<svg role="img" aria-label="{_e(title)}" width="{width}" '
             f'height="{chart_h + top_y + 30}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="0" y="16" class="ct">{_e(title)}</text>']
    for i, bucket in enumerate(buckets):
        x = 10 + i * col
        bar = chart_h * bucket["count"] / top
        le = bucket["le"]
        label = "+Inf" if le == float("inf") else (
            f"{le * 1000:g}ms" if le < 1 else f"{le:g}s")
        parts.append(f'<rect x="{x}" y="{top_y + chart_h - bar:.1f}" width="{col - 8}" '
                     f'height="{bar:.1f}" fill="#6a1b9a"/>')
        parts.append(f'<text x="{x + (col - 8) / 2}" y="{top_y - 4 + chart_h - bar:.1f}" '
                     f'text-anchor="middle">{bucket["count"] or ""}</text>')
        parts.append(f'<text x="{x + (col - 8) / 2}" y="{top_y + chart_h + 16}" '
                     f'text-anchor="middle" class="small">≤{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def timeline_chart(keys: Sequence[Mapping[str, Any]], now: float) -> str:
    """Each key version from creation to now: ACTIVE until its last state change, then the
    colour of its current state; a cross marks revocation."""
    versions = [(k["name"], v) for k in keys for v in k["versions"]]
    if not versions:
        return '<p class="note">Key versions timeline: no keys yet.</p>'
    start = float(min(v["created_at"] for _, v in versions))
    span = max(now - start, 1.0)
    row, label_w, plot_w = 22, 190, 520
    height = row * len(versions) + 50
    parts = [f'<svg role="img" aria-label="Key versions timeline" width="{label_w + plot_w + 20}"'
             f' height="{height}" xmlns="http://www.w3.org/2000/svg">',
             '<text x="0" y="16" class="ct">Key versions over time</text>']

    def x(t: float) -> float:
        return label_w + plot_w * (t - start) / span

    for i, (name, version) in enumerate(versions):
        y = 28 + i * row
        created, changed = version["created_at"], version["state_changed_at"]
        state = version["state"]
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">'
                     f'{_e(name)} v{_e(version["number"])}</text>')
        first_end = now if state == "ACTIVE" else max(created, changed)
        parts.append(f'<rect x="{x(created):.1f}" y="{y + 3}" '
                     f'width="{max(2.0, x(first_end) - x(created)):.1f}" height="14" '
                     f'fill="{STATE_COLOURS["ACTIVE"]}"/>')
        if state != "ACTIVE":
            parts.append(f'<rect x="{x(first_end):.1f}" y="{y + 3}" '
                         f'width="{max(2.0, x(now) - x(first_end)):.1f}" height="14" '
                         f'fill="{STATE_COLOURS.get(state, "#000")}"><title>{_e(state)}'
                         "</title></rect>")
        if version.get("revoked_at"):
            rx = x(version["revoked_at"])
            parts.append(f'<text x="{rx:.1f}" y="{y + 15}" text-anchor="middle" '
                         'style="fill:#fff" font-weight="bold">✕</text>')
    axis_y = 28 + len(versions) * row + 14
    parts.append(f'<text x="{label_w}" y="{axis_y}" class="small">{_e(_time(start))}</text>')
    parts.append(f'<text x="{label_w + plot_w}" y="{axis_y}" text-anchor="end" class="small">'
                 f"now ({_e(_time(now))})</text>")
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#212121;background:#fafafa}
header{background:#263238;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:center}
header h1{font-size:18px;margin:0}header a{color:#cfd8dc;text-decoration:none}
header a.here{color:#fff;font-weight:bold;border-bottom:2px solid #fff}
main{padding:16px 20px;display:grid;gap:16px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 16px}
h2{font-size:16px;margin:0 0 8px}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;vertical-align:top}
th{background:#f5f5f5}code{font-size:12px}
.badge{color:#fff;border-radius:3px;padding:1px 6px;font-size:12px;font-weight:bold}
.note{color:#616161;font-style:italic}.error{color:#b71c1c;font-weight:bold}
.ok{color:#2e7d32;font-weight:bold}.bad{color:#c62828;font-weight:bold}
.charts{display:flex;flex-wrap:wrap;gap:24px}svg text{font-size:12px;fill:#212121}
svg text.ct{font-weight:bold;font-size:13px}svg text.small{font-size:10px}
form{display:flex;gap:8px;margin-top:12px}input[type=password]{width:320px;padding:4px}
"""


def _layout(title: str, here: str, body: str, *, refresh: bool, generated_at: float) -> str:
    nav = "".join(
        f'<a href="{path}"{" class=here" if path == here else ""}>{_e(name)}</a>'
        for path, name in PAGES.items())
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>Signet — {_e(title)}</title>{meta}<style>{_STYLE}</style></head><body>"
        f"<header><h1>Signet</h1>{nav}<span style=\"margin-left:auto\">"
        f"read-only · {_e(_time(generated_at))}</span></header>"
        f"<main>{body}</main></body></html>"
    )


def _health_section(s: Summary) -> str:
    me = s["this_signer"]
    lease = ('<span class="ok">lease alive, key state current</span>' if me["current"]
             else '<span class="bad">cannot prove key state is current (lease or watch '
                  "lost): this signer refuses to sign</span>")
    region_rows = [[_e(r["name"]), _e(r["signers"]),
                    '<span class="ok">all current</span>' if not r["behind"]
                    else f'<span class="bad">{_e(r["behind"])} behind</span>']
                   for r in s["regions"]]
    signer_rows = [[
        f'<code>{_e(r["signer_id"])}</code>' + (" (this signer)" if r["this"] else ""),
        _e(r["region"]), _e(r["applied_revision"]),
        '<span class="ok">current</span>' if not r["behind"]
        else f'<span class="bad">{_e(r["behind"])} revisions behind</span>',
    ] for r in s["signers"]]
    return (
        "<section id=health><h2>Regions and signers</h2>"
        f"<p>This signer <code>{_e(me['signer_id'])}</code> in region "
        f"<b>{_e(me['region'])}</b>: {lease}; lease id {_e(me['lease_id'])}; key state at "
        f"revision {_e(me['key_state_revision'])}; etcd at revision "
        f"{_e(s['etcd_revision'])}.</p>"
        f"{_error(s['signers_error'])}"
        f'<p><b id=signer-count>{len(s["signers"])}</b> registered signer(s) in '
        f'{len(s["regions"])} region(s).</p>'
        + _table(("region", "signers", "state"), region_rows, "No region has a live signer.")
        + _table(("signer", "region", "applied revision", "vs this signer"), signer_rows,
                 "No signer is registered (none holds a live lease).")
        + "</section>")


def _bundle_section(s: Summary) -> str:
    bundle = s["bundle"]
    if bundle is None:
        body = _error(s["bundle_error"]) or '<p class="note">No trust bundle published yet.</p>'
    else:
        now = s["generated_at"]
        left = bundle["timestamp_expires"] - now
        expiry = (f'<span class="ok">expires in {_e(_span(left))}</span>' if left > 0
                  else f'<span class="bad">EXPIRED {_e(_span(left))} ago</span>')
        rows = [
            ["timestamp version", f'<b id=bundle-version>{_e(bundle["timestamp_version"])}</b>'],
            ["root / snapshot / targets", _e(f'{bundle["root_version"]} / '
                                             f'{bundle["snapshot_version"]} / '
                                             f'{bundle["targets_version"]}')],
            ["signed", _e(_time(bundle["timestamp_signed_at"]))],
            ["timestamp expiry", f'{_e(_time(bundle["timestamp_expires"]))} ({expiry})'],
            ["snapshot/targets expiry", _e(_time(bundle["metadata_expires"]))],
            ["key state revision", _e(bundle["bundle_etcd_revision"])],
            ["bundle sha256", f'<code>{_e(bundle["bundle_sha256"])}</code>'],
        ]
        body = "<table>" + "".join(f"<tr><th>{_e(name)}</th><td>{value}</td></tr>"
                                   for name, value in rows) + "</table>"
    return f"<section id=bundle><h2>Trust bundle</h2>{body}</section>"


def _keys_section(s: Summary) -> str:
    rows = []
    for key in s["keys"]:
        for v in key["versions"]:
            marks = []
            if v["primary"]:
                marks.append(_badge("PRIMARY", "#1565c0"))
            if v["revoked"] and v["state"] != "REVOKED":
                marks.append(_badge("REVOKED", STATE_COLOURS["REVOKED"]))
            rows.append([
                f"<b>{_e(key['name'])}</b>", _e(v["number"]),
                _badge(v["state"], STATE_COLOURS.get(v["state"], "#000")) + " "
                + " ".join(marks),
                _e(key["algorithm"]), _e(key["replication"]),
                f'<code title="{_e(v["key_id"])}">{_e(v["key_id"][:16])}…</code>',
                _e(_time(v["created_at"])), _e(_time(v["state_changed_at"])),
            ])
    return ("<section id=keys><h2>Keys and versions</h2>"
            + _table(("key", "version", "state", "algorithm", "replication", "key id",
                      "created", "state since"), rows, "No keys yet.")
            + "</section>")


def _ceremonies_section(s: Summary) -> str:
    ceremonies = s["ceremonies"]
    if not ceremonies["available"]:
        body = '<p class="note">Ceremonies are not available in this build.</p>'
    else:
        rows = [[
            f'<code>{_e(p["id"][:12])}</code>', _e(p["action"]), _e(p["description"]),
            f'<code>{_e(p["proposer"])}</code>',
            _e(f'{p["approvals"]} of {p["required"] if p["required"] is not None else "?"}'),
            _e(_time(p["expires_at"])),
        ] for p in ceremonies["proposals"]]
        body = _error(ceremonies["error"]) + _table(
            ("proposal", "action", "what it does", "proposer", "approvals", "expires"), rows,
            "No ceremony is waiting for approvals.")
    return f"<section id=ceremonies><h2>Pending ceremonies</h2>{body}</section>"


def _audit_section(s: Summary) -> str:
    audit = s["audit"]
    rows = [[
        _e(r["index"]), _e(r["time"]), _e(r["kind"]) + (f" ({_e(r['what'])})" if r["what"]
                                                          else ""),
        f'<code>{_e(r["identity"])}</code>', _e(r["key"]), _e(r["version"]),
        f'<code>{_e(r["request_id"])}</code>',
    ] for r in reversed(audit["entries"])]
    return (f"<section id=audit><h2>Recent audit entries</h2><p class=note>The newest "
            f"{AUDIT_ROWS} entries of this signer process's log <code>{_e(audit['log_id'])}"
            "</code> (other processes keep their own logs; verify them with "
            "<code>signet audit verify</code>).</p>" + _error(audit["error"])
            + _table(("#", "time", "kind", "identity", "key", "version", "request id"), rows,
                     "The audit log is empty.")
            + "</section>")


def _drills_section(s: Summary) -> str:
    drills = s["drills"]
    if not drills["configured"]:
        body = ('<p class="note">No reports directory is configured '
                "(<code>dashboard.reports_dir</code>).</p>")
    else:
        rows = [[
            _e(r["file"]), _e(_time(r["modified"])),
            _error(r["error"]) or "<br>".join(
                f"<b>{_e(k)}</b>: {_e(v)}" for k, v in list(r["fields"].items())[:10]),
        ] for r in drills["reports"]]
        body = _table(("report", "written", "summary"), rows, "No drill reports yet.")
    return f"<section id=drills><h2>Drill reports</h2>{body}</section>"


def _admission_section(s: Summary) -> str:
    admission = s["admission"]
    if not admission["configured"]:
        body = ('<p class="note">No admission decision log is configured '
                "(<code>dashboard.admission_log</code>; "
                "<code>signet admission serve --decision-log FILE</code> writes one).</p>")
    else:
        rows = [[
            _e(_time(d.get("time"))), _e(d.get("uid")),
            '<span class="ok">allowed</span>' if d.get("allowed") is True
            else '<span class="bad">denied</span>',
            _e(", ".join(str(i) for i in d.get("images", []) if isinstance(i, str))
               if isinstance(d.get("images"), list) else ""),
            _e(d.get("message")),
        ] for d in reversed(admission["decisions"])]
        body = _table(("time", "review uid", "decision", "images", "message"), rows,
                      "No admission decisions recorded yet.")
    return f"<section id=admission><h2>Admission decisions</h2>{body}</section>"


def _charts_section(s: Summary) -> str:
    totals: dict[str, float] = {}
    failed: dict[str, float] = {}
    for row in s["metrics"]["signatures"]:
        target = totals if row["outcome"] == "ok" else failed
        target[row["key"]] = target.get(row["key"], 0) + row["count"]
    return (
        "<section id=charts><h2>Signing in this process</h2><div class=charts>"
        + bar_chart("Signatures per key", sorted(totals.items()))
        + (bar_chart("Refused or failed signs per key", sorted(failed.items()),
                     colour="#c62828") if failed else "")
        + histogram_chart("Sign latency (requests per bucket)", s["metrics"]["sign_latency"])
        + "</div></section>")


def render_page(path: str, summary: Summary) -> str:
    """The HTML of one dashboard page (a key of ``PAGES``) from a summary. Raises
    ``KeyError`` for another path."""
    title = PAGES[path]
    sections = {
        ROOT: (_health_section, _bundle_section, _charts_section),
        f"{ROOT}/keys": (_keys_section,),
        f"{ROOT}/audit": (_audit_section,),
        f"{ROOT}/operations": (_ceremonies_section, _drills_section, _admission_section),
    }[path]
    body = "".join(section(summary) for section in sections)
    if path == f"{ROOT}/keys":
        body += ("<section id=timeline><h2>Timeline</h2>"
                 + timeline_chart(summary["keys"], summary["generated_at"]) + "</section>")
    return _layout(title, path, body, refresh=True, generated_at=summary["generated_at"])


def render_login(message: str = "") -> str:
    """The login form; ``message`` is a fixed text of ours (never the submitted token)."""
    body = ("<section><h2>Signet dashboard</h2><p>Enter the read-only dashboard token "
            "(the file named by <code>dashboard.token_file</code>).</p>"
            + _error(message)
            + f'<form method=post action="{ROOT}/login"><input type=password name=token '
              'autocomplete=off autofocus aria-label=token><button type=submit>Sign in'
              "</button></form></section>")
    return _layout("Sign in", "", body, refresh=False, generated_at=time.time())


# -- serve ---------------------------------------------------------------------------------


def _html(status: int, text: str, *extra: str) -> HttpResponse:
    return HttpResponse(status, text.encode(), "text/html; charset=utf-8",
                        (*SECURITY_HEADERS, *extra))


class Dashboard:
    """The ``/dashboard`` route: token checks, then pages built from a fresh summary."""

    def __init__(self, tokens: TokenCheck,
                 summary: Callable[[], Awaitable[Summary]]) -> None:
        self._tokens = tokens
        self._summary = summary

    @property
    def routes(self) -> dict[str, Callable[[HttpRequest], Awaitable[HttpResponse]]]:
        return {ROOT: self.handle}

    async def handle(self, request: HttpRequest) -> HttpResponse:  # noqa: PLR0911
        """Answer one request. Unauthorised requests get 401 and learn nothing; nothing here
        logs the request target, since it may carry ``?token=``."""
        path, _, query = request.target.partition("?")
        path = path.rstrip("/") or "/"
        if path == f"{ROOT}/login":
            return self._login(request)
        if request.method == "POST":
            return HttpResponse(405, b"only the login form is posted\n",
                                headers=("Allow: GET, HEAD",))
        given = urllib.parse.parse_qs(query).get("token")
        if given:
            if not self._tokens.token_ok(given[0]):
                return _html(401, render_login("That token was not accepted."))
            # Redirect to a fixed path, so the token leaves the address bar and history.
            location = path if path in PAGES else ROOT
            return HttpResponse(303, b"", headers=(
                *SECURITY_HEADERS, f"Location: {location}", self._tokens.set_cookie()))
        api = path == f"{ROOT}/api/summary.json"
        if not self._tokens.authorized(request):
            if api:
                return HttpResponse(
                    401, b'{"error": "a dashboard bearer token is required"}\n',
                    "application/json",
                    (*SECURITY_HEADERS, 'WWW-Authenticate: Bearer realm="signet-dashboard"'))
            return _html(401, render_login(), 'WWW-Authenticate: Bearer realm="signet-dashboard"')
        if api:
            body = json.dumps(await self._summary(), indent=1, sort_keys=True).encode()
            return HttpResponse(200, body, "application/json", SECURITY_HEADERS)
        if path not in PAGES:
            return HttpResponse(404, b"no such dashboard page\n", headers=SECURITY_HEADERS)
        return _html(200, render_page(path, await self._summary()))

    def _login(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return _html(200, render_login())
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/x-www-form-urlencoded":
            return HttpResponse(415, b"post the login form\n", headers=SECURITY_HEADERS)
        form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"))
        given = form.get("token", [""])[0].strip()
        if not given or not self._tokens.token_ok(given):
            return _html(401, render_login("That token was not accepted."))
        return HttpResponse(303, b"", headers=(
            *SECURITY_HEADERS, f"Location: {ROOT}", self._tokens.set_cookie()))


def dashboard_routes(config: DashboardConfig | None, sources: DashboardSources
                     ) -> dict[str, Callable[[HttpRequest], Awaitable[HttpResponse]]]:
    """The ``/dashboard`` routes for ``signer.http``, reading ``sources`` on every page; none
    when no token file is configured, or (logged) when it is unusable — the signer keeps
    signing without a dashboard rather than refusing to start over it."""
    if config is None:
        return {}
    try:
        tokens = TokenCheck(load_token(config.token_file))
    except InvalidArgument as error:
        log.error("the dashboard is off: %s", error.diagnostics())  # noqa: TRY400
        return {}
    sources.reports_dir = config.reports_dir
    sources.admission_log = config.admission_log
    log.info("dashboard at /dashboard on the /tuf/ port (bearer token from %s)",
             config.token_file)
    return Dashboard(tokens, lambda: collect_summary(sources)).routes
