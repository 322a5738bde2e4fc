"""The dashboard's pure parts: rendering from fixed data, escaping, token checks, readers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kms.errors import InvalidArgument
from signer.config import DashboardConfig, ServerConfig
from signer.dashboard import (
    COOKIE_NAME,
    PAGES,
    ROOT,
    Dashboard,
    Summary,
    TokenCheck,
    audit_rows,
    load_token,
    metric_summary,
    read_reports,
    render_login,
    render_page,
    tail_jsonl,
)
from signer.http import HttpRequest, HttpResponse
from signer.telemetry import Metrics

TOKEN = "0123456789abcdef-dashboard-token"
NOW = 1_700_000_000.0
EVIL = '<script>alert("x")</script>'


def _version(number: int, state: str, *, primary: bool = False,
             revoked_at: float | None = None) -> dict[str, Any]:
    return {"number": number, "state": state, "revoked": revoked_at is not None,
            "primary": primary, "key_id": f"{number:02d}" * 32, "created_at": NOW - 3600 * number,
            "state_changed_at": NOW - 600, "revoked_at": revoked_at}


def summary(name: str = "release", identity: str = "spiffe://signet.dev/pipeline",
            request_id: str = "req-0001") -> Summary:
    """A summary as ``collect_summary`` builds it, with user-controlled strings in place."""
    return {
        "format": "signet-dashboard/v1", "generated_at": NOW,
        "this_signer": {"signer_id": "eu/host-1-ab", "region": "eu", "lease_id": 77,
                        "current": True, "key_state_revision": 40},
        "etcd_revision": 52,
        "regions": [{"name": "eu", "signers": 2, "behind": 1}],
        "signers": [
            {"signer_id": "eu/host-1-ab", "region": "eu", "applied_revision": 40, "behind": 0,
             "this": True},
            {"signer_id": "eu/host-2-cd", "region": "eu", "applied_revision": 38, "behind": 2,
             "this": False},
        ],
        "signers_error": "",
        "keys": [{"name": name, "algorithm": "ecdsa-p256", "replication": "multi-region",
                  "primary_version": 2, "min_sign_version": 1, "created_at": NOW - 7200,
                  "rotation_period_seconds": None, "mod_revision": 39,
                  "versions": [_version(1, "REVOKED", revoked_at=NOW - 600),
                               _version(2, "ACTIVE", primary=True)]}],
        "bundle": {"root_version": 1, "timestamp_version": 9, "snapshot_version": 4,
                   "targets_version": 4, "bundle_sha256": "ab" * 32,
                   "bundle_etcd_revision": 40, "online_key_ids": ["cd" * 32],
                   "timestamp_signed_at": NOW - 10, "timestamp_expires": NOW + 86_390,
                   "metadata_expires": NOW + 7 * 86_400, "recent_bundles": []},
        "bundle_error": "",
        "ceremonies": {"available": True, "error": "", "proposals": [{
            "id": "f" * 64, "action": "rotate", "description": f"rotate key {name!r}",
            "proposer": identity, "created_at": NOW - 60, "expires_at": NOW + 3600,
            "approvals": 1, "required": 2}]},
        "audit": {"log_id": "eu/host-1-ab", "error": "", "entries": [
            {"index": 7, "time": "2023-11-14T22:13:20.000000Z", "kind": "sign",
             "identity": identity, "key": name, "version": 2, "request_id": request_id,
             "what": ""},
            {"index": 8, "time": "2023-11-14T22:13:21.000000Z", "kind": "admin",
             "identity": identity, "key": name, "version": 1, "request_id": None,
             "what": "revoke"}]},
        "drills": {"configured": True, "reports": [
            {"file": "failover.json", "modified": NOW - 100, "error": "",
             "fields": {"scenario": "kill-region", "passed": True, "note": identity}}]},
        "admission": {"configured": True, "decisions": [
            {"time": NOW - 5, "uid": request_id, "allowed": False,
             "images": ["registry.example/app@sha256:" + "a" * 64],
             "message": f"rule failed for {identity}"}]},
        "metrics": {"signatures": [{"key": name, "outcome": "ok", "count": 5},
                                   {"key": name, "outcome": "FAILED_PRECONDITION", "count": 1}],
                    "sign_latency": [{"le": 0.001, "count": 3}, {"le": 0.005, "count": 2},
                                     {"le": float("inf"), "count": 0}]},
    }


def all_pages(data: Summary) -> str:
    return "".join(render_page(path, data) for path in PAGES)


def test_pages_show_every_section_from_fixed_data() -> None:
    data = summary()
    overview = render_page(ROOT, data)
    assert "eu/host-2-cd" in overview
    assert "2 revisions behind" in overview
    assert '<b id=signer-count>2</b>' in overview
    assert '<b id=bundle-version>9</b>' in overview
    assert "expires in 24.0 h" in overview
    assert "Signatures per key" in overview
    assert "<svg" in overview
    keys = render_page(f"{ROOT}/keys", data)
    assert "REVOKED" in keys
    assert "PRIMARY" in keys
    assert "Key versions over time" in keys
    audit = render_page(f"{ROOT}/audit", data)
    assert "req-0001" in audit
    assert "admin (revoke)" in audit
    operations = render_page(f"{ROOT}/operations", data)
    assert "rotate key &#x27;release&#x27;" in operations
    assert "1 of 2" in operations
    assert "failover.json" in operations
    assert "kill-region" in operations
    assert "denied" in operations


def test_pages_load_nothing_from_elsewhere_and_run_no_script() -> None:
    html = all_pages(summary()) + render_login()
    assert "<script" not in html.lower()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html


@pytest.mark.parametrize("field", ["name", "identity", "request_id"])
def test_user_controlled_strings_are_escaped_everywhere(field: str) -> None:
    html = all_pages(summary(**{field: EVIL}))
    assert EVIL not in html
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


def test_missing_sections_are_explained_not_blank() -> None:
    data = summary()
    data["ceremonies"] = {"available": False, "proposals": [], "error": ""}
    data["drills"] = {"configured": False, "reports": []}
    data["admission"] = {"configured": False, "decisions": []}
    data["bundle"], data["bundle_error"] = None, "trust bundle: etcd is unreachable"
    operations = render_page(f"{ROOT}/operations", data)
    assert "Ceremonies are not available in this build" in operations
    assert "dashboard.reports_dir" in operations
    assert "--decision-log" in operations
    assert "etcd is unreachable" in render_page(ROOT, data)


# -- token checks ----------------------------------------------------------------------------


def _handle(request: HttpRequest, data: Summary | None = None) -> HttpResponse:
    async def collect() -> Summary:
        return data or summary()

    return asyncio.run(Dashboard(TokenCheck(TOKEN), collect).handle(request))


def _get(target: str, **headers: str) -> HttpResponse:
    return _handle(HttpRequest("GET", target, {k.lower(): v for k, v in headers.items()}))


def _header(response: HttpResponse, name: str) -> str:
    found = [h.split(":", 1)[1].strip() for h in response.headers
             if h.lower().startswith(name.lower() + ":")]
    assert len(found) == 1, response.headers
    return found[0]


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer wrong-token-of-some-length"}, {"authorization": TOKEN},
    {"authorization": f"Basic {TOKEN}"}, {"cookie": f"{COOKIE_NAME}={TOKEN}"},
    {"cookie": f"{COOKIE_NAME}=" + "0" * 64},
])
@pytest.mark.parametrize("path", [ROOT, f"{ROOT}/keys", f"{ROOT}/api/summary.json"])
def test_requests_without_the_token_get_401_and_no_data(path: str,
                                                        headers: dict[str, str]) -> None:
    response = _handle(HttpRequest("GET", path, headers))
    assert response.status == 401
    assert b"release" not in response.body
    assert b"eu/host-1-ab" not in response.body
    assert TOKEN.encode() not in response.body
    assert "Bearer" in _header(response, "WWW-Authenticate")


def test_bearer_token_opens_pages_and_the_json_summary() -> None:
    page = _get(ROOT, Authorization=f"Bearer {TOKEN}")
    assert page.status == 200
    assert b"eu/host-1-ab" in page.body
    assert "default-src 'none'" in _header(page, "Content-Security-Policy")
    api = _get(f"{ROOT}/api/summary.json", Authorization=f"Bearer {TOKEN}")
    assert api.status == 200
    assert api.content_type == "application/json"
    assert json.loads(api.body)["keys"][0]["name"] == "release"
    assert TOKEN.encode() not in page.body + api.body


def test_query_token_sets_a_strict_cookie_and_redirects_without_it() -> None:
    response = _get(f"{ROOT}/keys?token={TOKEN}")
    assert response.status == 303
    assert _header(response, "Location") == f"{ROOT}/keys"
    cookie = _header(response, "Set-Cookie")
    flags = [part.strip() for part in cookie.split(";")]
    assert {"HttpOnly", "Secure", "SameSite=Strict", f"Path={ROOT}"} <= set(flags)
    name, _, value = flags[0].partition("=")
    assert name == COOKIE_NAME
    assert value
    assert TOKEN not in cookie
    assert _get(ROOT, Cookie=f"other=1; {COOKIE_NAME}={value}").status == 200


def test_wrong_query_token_is_refused_without_echoing_it() -> None:
    response = _get(f"{ROOT}?token=not-the-token-{EVIL}")
    assert response.status == 401
    assert b"not-the-token" not in response.body
    assert b"<script>alert" not in response.body
    assert not any(h.startswith("Set-Cookie") for h in response.headers)


def test_redirect_after_login_goes_only_to_dashboard_pages() -> None:
    response = _get(f"{ROOT}/../../elsewhere?token={TOKEN}")
    assert _header(response, "Location") == ROOT


def test_login_form_post() -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    good = _handle(HttpRequest("POST", f"{ROOT}/login", form, f"token={TOKEN}".encode()))
    assert good.status == 303
    assert _header(good, "Location") == ROOT
    assert "HttpOnly" in _header(good, "Set-Cookie")
    bad = _handle(HttpRequest("POST", f"{ROOT}/login", form, b"token=guess-guess-guess"))
    assert bad.status == 401
    assert b"guess" not in bad.body
    assert _handle(HttpRequest("POST", f"{ROOT}/login", {}, b"token=x")).status == 415
    login = _get(f"{ROOT}/login")
    assert login.status == 200
    assert b'type=password name=token' in login.body
    assert _handle(HttpRequest("POST", ROOT, form, f"token={TOKEN}".encode())).status == 405


def test_unknown_page_is_404_once_authorised() -> None:
    assert _get(f"{ROOT}/nope", Authorization=f"Bearer {TOKEN}").status == 404


def test_token_file_must_hold_a_long_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert load_token(path) == TOKEN
    path.write_text("short")
    with pytest.raises(InvalidArgument) as raised:
        load_token(path)
    assert "short" not in str(raised.value)
    with pytest.raises(InvalidArgument):
        load_token(tmp_path / "missing")


# -- readers ---------------------------------------------------------------------------------


def test_audit_tail_keeps_only_shown_fields(tmp_path: Path) -> None:
    path = tmp_path / "entries.jsonl"
    lines = [json.dumps({"index": i, "time": "t", "kind": "sign", "identity": "id",
                         "key": "k", "version": 1, "request_id": f"r{i}",
                         "digest": "sha256:" + "e" * 64}) for i in range(5)]
    path.write_text("\n".join(lines) + '\n{"index": 5, "torn')
    rows = audit_rows(tail_jsonl(path, 3))
    assert [r["request_id"] for r in rows] == ["r2", "r3", "r4"]
    assert all("digest" not in r for r in rows)
    assert tail_jsonl(tmp_path / "none.jsonl", 3) == []


def test_drill_reports_newest_first_with_scalar_fields(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"scenario": "pause", "steps": [1, 2],
                                                 "settings": {"region": "eu", "x": [1]}}))
    (tmp_path / "b.json").write_text("[1, 2]")
    (tmp_path / "20250101").mkdir()
    (tmp_path / "20250101" / "drill-report.json").write_text('{"passed": true}')
    (tmp_path / "20250101" / "drill-report.sig.json").write_text('{"sig": "x"}')
    reports = {r["file"]: r for r in read_reports(tmp_path)}
    assert set(reports) == {"a.json", "b.json", "20250101/drill-report.json"}
    assert reports["a.json"]["fields"] == {"scenario": "pause", "settings.region": "eu"}
    assert reports["b.json"]["error"].startswith("unreadable")
    assert read_reports(tmp_path / "missing") == []


def test_metric_summary_reads_counters_and_histogram_buckets() -> None:
    recorded = Metrics(CollectorRegistry())
    recorded.signatures.labels(key="release", outcome="ok").inc(3)
    recorded.sign_seconds.labels(method="SignDigest").observe(0.0007)
    recorded.sign_seconds.labels(method="SignBatch").observe(0.003)
    found = metric_summary(recorded.registry)
    assert found["signatures"] == [{"key": "release", "outcome": "ok", "count": 3}]
    counts = {b["le"]: b["count"] for b in found["sign_latency"]}
    assert counts[0.001] == 1
    assert counts[0.005] == 1
    assert sum(counts.values()) == 2


def test_config_dashboard_section(tmp_path: Path) -> None:
    base = {"listen": "127.0.0.1:0", "insecure": True, "etcd": {"endpoints": ["127.0.0.1:1"]},
            "hsm": {"token_label": "t", "pin_env": "PIN"}}
    assert ServerConfig.from_dict(base, base=tmp_path).dashboard is None
    config = ServerConfig.from_dict({**base, "dashboard": {"token_file": "tok",
                                                           "reports_dir": "/r"}}, base=tmp_path)
    assert config.dashboard == DashboardConfig(tmp_path / "tok", Path("/r"), None)
    for bad in ({"token": TOKEN}, {"reports_dir": "r"}, {"token_file": "t", "x": 1}):
        with pytest.raises(InvalidArgument) as raised:
            ServerConfig.from_dict({**base, "dashboard": bad}, base=tmp_path)
        assert TOKEN not in str(raised.value)
