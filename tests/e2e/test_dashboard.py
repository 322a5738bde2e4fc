"""The dashboard of a real dev cluster, driven in headless Chromium (Debian's ``chromium``).

The cluster gets real data first — keys created, rotated and revoked through custodian
ceremonies, signatures with known request ids, a ceremony left pending, a drill report — and
the browser then checks each page shows it. Screenshots of every page go to a temporary
folder, and also to ``docs/screenshots/`` with ``SIGNET_SAVE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kms.domain.keys import Algorithm, Digest, DigestAlgorithm
from tests.fixtures.cluster import RunningCluster

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
REQUEST_IDS = [f"dash-req-{n}" for n in range(1, 4)]

import playwright.sync_api as playwright_sync  # noqa: E402 - after the constants it documents

if not CHROMIUM.exists():  # `make test` installs Debian's chromium; missing means set-up failed
    pytest.fail("Debian's chromium is not installed: run `make system-packages`",
                pytrace=False)

pytestmark = pytest.mark.timeout(600)


def _digest(n: int) -> Digest:
    return Digest(DigestAlgorithm.SHA256, hashlib.sha256(f"dashboard-{n}".encode()).digest())


@pytest.fixture(scope="module")
def populated(dev_cluster: RunningCluster) -> RunningCluster:
    """Two keys; ``release`` rotated with version 1 revoked; signatures with known request
    ids; a rotation of ``builds`` proposed but not approved; one drill report."""
    cluster = dev_cluster
    cluster.create_key("release", Algorithm.ECDSA_P256_SHA256)
    cluster.create_key("builds", Algorithm.ECDSA_P256_SHA256)
    cluster.rotate_key("release")
    cluster.lifecycle("revoke", "release", 1)
    with cluster.client() as pipeline:
        for n, request_id in enumerate(REQUEST_IDS):
            pipeline.sign_digest("release", _digest(n), request_id=request_id)
        pipeline.sign_digest("builds", _digest(99), request_id="dash-req-builds")
    cluster.propose("rotate", name="builds")
    reports = cluster.dev.state_dir / "drills" / "20250101-000000"
    reports.mkdir(parents=True, exist_ok=True)
    # Stands in for a `signet drill` report (a one-region cluster cannot run a failover
    # drill): the dashboard lists any JSON object there.
    (reports / "drill-report.json").write_text(json.dumps({
        "passed": True, "rto_seconds": 1.8, "fail_closed_seconds": 4.9,
        "settings": {"region": "local", "mode": "kill-signer", "load": 4}}))
    return cluster


def _dashboard(cluster: RunningCluster) -> tuple[str, str]:
    extra = cluster.cluster.extra
    return str(extra["dashboard_url"]), Path(extra["dashboard_token_file"]).read_text().strip()


def _fetch(cluster: RunningCluster, path: str, token: str | None) -> tuple[int, bytes]:
    url, _ = _dashboard(cluster)
    context = ssl.create_default_context(cafile=str(cluster.cluster.ca))
    assert url.startswith("https://")  # from cluster.json; never file: or another scheme
    request = urllib.request.Request(url.removesuffix("/dashboard") + path)  # noqa: S310
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(  # noqa: S310 - https only, checked above
                request, context=context, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _summary(cluster: RunningCluster) -> dict[str, Any]:
    """The JSON summary once the trust bundle reflects the revocation."""
    _, token = _dashboard(cluster)
    deadline = time.monotonic() + 30
    while True:
        status, body = _fetch(cluster, "/dashboard/api/summary.json", token)
        assert status == 200, body
        summary: dict[str, Any] = json.loads(body)
        bundle = summary["bundle"]
        if bundle and bundle["bundle_etcd_revision"] >= summary["this_signer"][
                "key_state_revision"] - 50 and summary["audit"]["entries"]:
            return summary
        assert time.monotonic() < deadline, summary
        time.sleep(0.5)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("screenshots")
    yield directory
    if os.environ.get("SIGNET_SAVE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for shot in directory.glob("*.png"):
            shutil.copy(shot, DOCS_SCREENSHOTS / shot.name)


def test_the_json_summary_needs_the_token_and_shows_the_cluster(populated: RunningCluster
                                                                ) -> None:
    _, token = _dashboard(populated)
    for wrong in (None, "x" * len(token), token[:-1]):
        status, body = _fetch(populated, "/dashboard/api/summary.json", wrong)
        assert status == 401
        assert b"release" not in body
        assert token.encode() not in body
    summary = _summary(populated)
    keys = {k["name"]: k for k in summary["keys"]}
    assert set(keys) == {"release", "builds"}
    release = {v["number"]: v for v in keys["release"]["versions"]}
    assert release[1]["state"] == "REVOKED"
    assert release[2]["primary"]
    assert len(summary["signers"]) == 1
    assert summary["this_signer"]["current"]
    entries = {e["request_id"] for e in summary["audit"]["entries"]}
    assert set(REQUEST_IDS) <= entries
    assert all("digest" not in e for e in summary["audit"]["entries"])
    assert [p["action"] for p in summary["ceremonies"]["proposals"]] == ["rotate"]
    ok = {s["key"]: s["count"] for s in summary["metrics"]["signatures"] if s["outcome"] == "ok"}
    assert ok == {"release": 3, "builds": 1}


def test_headless_chromium_shows_every_page_with_real_data(
    populated: RunningCluster, screenshots: Path, tmp_path: Path,
) -> None:
    url, token = _dashboard(populated)
    summary = _summary(populated)
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, ignore_https_errors=True,
            viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()

            # Without a token: the login form, and no data.
            response = page.goto(url)
            assert response is not None
            assert response.status == 401
            assert "release" not in page.content()
            page.screenshot(path=str(screenshots / "dashboard-login.png"))

            # A wrong token is refused and not echoed.
            response = page.goto(f"{url}?token=wrong-token-{'x' * 24}")
            assert response is not None
            assert response.status == 401
            assert "wrong-token" not in page.content()
            assert "not accepted" in page.inner_text("main")
            assert browser.cookies() == []

            # The right token through the form: a cookie, and the overview.
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_url(url)
            assert token not in page.url
            cookie = next(c for c in browser.cookies() if c["name"] == "signet_dashboard")
            assert cookie["httpOnly"]
            assert cookie["secure"]
            assert cookie["sameSite"] == "Strict"
            assert cookie["value"] != token

            overview = page.inner_text("main")
            assert page.inner_text("#signer-count") == "1"
            assert summary["this_signer"]["signer_id"] in overview
            assert "lease alive, key state current" in overview
            assert int(page.inner_text("#bundle-version")) >= summary["bundle"][
                "timestamp_version"]
            assert "expires in" in overview
            assert page.locator("#charts svg").count() >= 2  # signatures per key, latency
            assert "release" in page.inner_text("#charts")
            page.screenshot(path=str(screenshots / "dashboard-overview.png"), full_page=True)

            page.click("text=Keys")
            keys = page.inner_text("#keys")
            for expected in ("release", "builds", "REVOKED", "PRIMARY", "ACTIVE"):
                assert expected in keys
            revoked_row = page.locator("#keys tr", has_text="REVOKED").inner_text()
            assert "release" in revoked_row
            assert page.locator("#timeline svg").count() == 1
            page.screenshot(path=str(screenshots / "dashboard-keys.png"), full_page=True)

            page.click("text=Audit")
            audit = page.inner_text("#audit")
            for request_id in REQUEST_IDS:
                assert request_id in audit
            assert "spiffe://signet.dev/pipeline" in audit
            page.screenshot(path=str(screenshots / "dashboard-audit.png"), full_page=True)

            page.click("text=Operations")
            assert "rotate key 'builds'" in page.inner_text("#ceremonies")
            assert "20250101-000000/drill-report.json" in page.inner_text("#drills")
            assert "settings.mode: kill-signer" in page.inner_text("#drills")
            assert "No admission decision log is configured" in page.inner_text("#admission")
            page.screenshot(path=str(screenshots / "dashboard-operations.png"), full_page=True)
        finally:
            browser.close()
    assert sorted(p.name for p in screenshots.glob("*.png")) == [
        "dashboard-audit.png", "dashboard-keys.png", "dashboard-login.png",
        "dashboard-operations.png", "dashboard-overview.png"]
