"""``GET /metrics`` of a running service: present, and moving as the fleet changes.

A real service on loopback with sandbox nodes and a signed repository; the metrics are
scraped over HTTP and parsed with prometheus-client's own parser, as Prometheus would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from prometheus_client.parser import text_string_to_metric_families

from tests.events import until
from tests.fleet import Fleet, fleet
from tests.repository import Repo

BERLIN = ZoneInfo("Europe/Berlin")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(f: Fleet, accept: str | None = None) -> Samples:
    headers = {"Accept": accept} if accept else {}
    async with f.api.session.get(f"{f.api.base}/metrics", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == ("text/plain; version=0.0.4; charset=utf-8")
        return parse(await response.text())


async def scrape_until(f: Fleet, check: Callable[[Samples], bool], within: float = 20.0) -> Samples:
    """Scrape until ``check`` holds: the counters follow events delivered to their own
    subscriber, so a bounded poll is the way to see them move."""
    found: list[Samples] = []

    async def holds() -> bool:
        found[:] = [await scrape(f)]
        return check(found[0])

    await until(holds, within=within)
    return found[0]


def package_size(repo: Repo, name: str) -> int:
    manifest = json.loads((repo.root / "channels" / "stable.json").read_text())
    return sum(p["size"] for p in manifest["packages"] if p["name"] == name)


async def test_metrics_present_and_moving(tmp_path: Path) -> None:
    sections = {"notify": {"admin_emails": ["ops@example.org"]}}
    async with fleet(tmp_path, sections=sections) as f:
        first = await scrape(f)
        info = value(first, "tgops_info", version="0.1.0", tgops_instance=f.service.instance)
        assert info == 1.0
        assert value(first, "tgops_store_up") == 1.0
        # one instance on SQLite: it leads
        assert value(first, "tgops_leader", tgops_instance=f.service.instance) == 1.0
        for node, cluster in [("tg1", "c1"), ("tg2", "c1"), ("tg3", "c1"), ("solo1", "")]:
            for name in (
                "tgops_node_warning_flag",
                "tgops_node_update_lock",
                "tgops_node_restart_required",
                "tgops_node_in_maintenance",
            ):
                assert value(first, name, node=node, cluster=cluster) == 0.0, (name, node)
            assert value(first, "tgops_node_reachable", node=node, cluster=cluster) == 1.0
        assert value(first, "tgops_cluster_slots_limit", cluster="c1") == 1.0
        assert value(first, "tgops_cluster_slots_in_use", cluster="c1") == 0.0
        assert value(first, "tgops_cluster_slot_waiters", cluster="c1") == 0.0
        ok_before = value(first, "tgops_download_attempts_total", outcome="ok")
        transient_before = value(first, "tgops_download_attempts_total", outcome="transient")
        assert ok_before is not None and transient_before is not None
        assert value(first, "tgops_runs_total", kind="download", outcome="succeeded") is None
        assert value(first, "process_resident_memory_bytes") is not None

        # a successful download: a run counted, its duration observed, bytes and attempts
        assert await f.outcomes("download tg1") == {"tg1": "succeeded"}
        done = await scrape_until(
            f,
            lambda s: (
                value(s, "tgops_run_duration_seconds_count", kind="download", outcome="succeeded")
                == 1.0
            ),
        )
        assert value(done, "tgops_runs_total", kind="download", outcome="succeeded") == 1.0
        assert (
            value(done, "tgops_run_duration_seconds_sum", kind="download", outcome="succeeded") or 0
        ) > 0
        assert value(done, "tgops_download_bytes_total", node="tg1") == package_size(
            f.repo, "tg-base"
        )
        # one attempt at the manifest, one at the package
        assert value(done, "tgops_download_attempts_total", outcome="ok") == ok_before + 2
        assert (
            value(done, "tgops_node_pending_packages", node="tg1", cluster="c1", kind="update")
            == 1.0
        )

        # a failing download: attempts retried, the run failed, the warning flag set
        f.server.fail_next(100, status=503)
        assert await f.outcomes("download solo1") == {"solo1": "failed"}
        f.server.reset()
        failed = await scrape_until(
            f, lambda s: value(s, "tgops_runs_total", kind="download", outcome="failed") == 1.0
        )
        assert value(failed, "tgops_node_warning_flag", node="solo1", cluster="") == 1.0
        assert (
            value(failed, "tgops_download_attempts_total", outcome="transient")
            == transient_before + 2
        )
        # the admins' alert about it: no SMTP host is configured, so it fails for good
        mailed = await scrape_until(
            f,
            lambda s: (value(s, "tgops_outbox_items", channel="email", status="failed") or 0) >= 1,
        )
        assert value(mailed, "tgops_outbox_items", channel="email", status="pending") in {
            None,
            0.0,
        }

        # maintenance scheduled for tomorrow: its start, not yet in maintenance
        start = (datetime.now(BERLIN) + timedelta(days=1)).replace(
            hour=10, minute=0, second=0, microsecond=0
        )
        reply = await f.api.command(f"maintenance schedule tg3 {start:%Y-%m-%d %H:%M} Disk swap")
        assert reply["ok"], reply["text"]
        planned = await scrape(f)
        assert (
            value(
                planned, "tgops_node_maintenance_start_timestamp_seconds", node="tg3", cluster="c1"
            )
            == start.timestamp()
        )
        assert value(planned, "tgops_node_in_maintenance", node="tg3", cluster="c1") == 0.0

        # a run in progress is active; the cluster slot stays held by a failed update
        f.server.hold()
        reply = await f.api.command("download tg3")
        assert reply["ok"], reply["text"]
        await scrape_until(
            f, lambda s: value(s, "tgops_runs_active", kind="download", status="running") == 1.0
        )
        f.server.release()
        await scrape_until(
            f, lambda s: value(s, "tgops_runs_total", kind="download", outcome="succeeded") == 2.0
        )
        (f.root / "nodes" / "tg2").mkdir(parents=True, exist_ok=True)
        (f.root / "nodes" / "tg2" / "faults.json").write_text('{"install": "disk full"}')
        assert await f.outcomes("auto-update c1 --yes") == {
            "tg1": "succeeded",
            "tg2": "failed",
            "tg3": "cancelled",
        }
        locked = await scrape_until(
            f, lambda s: value(s, "tgops_runs_total", kind="auto-update", outcome="failed") == 1.0
        )
        assert value(locked, "tgops_node_update_lock", node="tg2", cluster="c1") == 1.0
        assert value(locked, "tgops_cluster_slots_in_use", cluster="c1") == 1.0
        assert value(locked, "tgops_runs_active", kind="download", status="running") is None
        assert value(locked, "tgops_runs_total", kind="auto-update", outcome="succeeded") == 1.0
        assert value(locked, "tgops_runs_total", kind="auto-update", outcome="cancelled") == 1.0


async def test_openmetrics_on_request_and_one_registry_per_service(tmp_path: Path) -> None:
    async with fleet(tmp_path / "a") as a, fleet(tmp_path / "b") as b:
        assert await a.outcomes("download tg1") == {"tg1": "succeeded"}
        await scrape_until(
            a, lambda s: value(s, "tgops_runs_total", kind="download", outcome="succeeded") == 1.0
        )
        other = await scrape(b)
        assert value(other, "tgops_runs_total", kind="download", outcome="succeeded") is None
        assert value(other, "tgops_info", version="0.1.0", tgops_instance=b.service.instance) == 1.0

        accept = "application/openmetrics-text; version=1.0.0; charset=utf-8"
        async with a.api.session.get(
            f"{a.api.base}/metrics", headers={"Accept": accept}
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            body = await response.text()
        assert body.endswith("# EOF\n")
        assert 'tgops_runs_total{kind="download",outcome="succeeded"} 1.0' in body
