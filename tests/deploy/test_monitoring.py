"""deploy/prometheus and deploy/grafana: promtool accepts the config and the rules, the alerts fire when they
should (alerts_test.yml), and every metric they name is one Timbre exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from timbre_common import metrics  # noqa: F401 - registers Timbre's metrics
from timbre_common.testing import promtool_path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "timbre.json"


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    done = subprocess.run([promtool_path(), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_alert_rules_pass_promtool_check():
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")


def test_alerts_fire_on_the_series_that_should_fire_them():
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_scrape_config_passes_promtool_check(tmp_path: Path):
    # The bearer secrets are files next to the config in a deployment; here, stand-ins.
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    (tmp_path / "secrets").mkdir()
    for name in ("admin_secret", "metrics_secret"):
        (tmp_path / "secrets" / name).write_text("stand-in\n")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml", cwd=tmp_path)


def _exported_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # Series not observed yet (no labels set) still count by their family's suffixed names.
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001
        names.update(REGISTRY._collector_to_names[collector])  # noqa: SLF001
    return names


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\btimbre_[a-z0-9_]+", text))


def _queries(path: Path) -> list[str]:
    if path.suffix == ".json":
        return [t["expr"] for p in json.loads(path.read_text())["panels"] for t in p.get("targets", [])]
    return [rule["expr"] for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("path", [PROMETHEUS / "alerts.yml", DASHBOARD], ids=lambda p: p.name)
def test_every_metric_queried_is_exported(path: Path):
    named = set().union(*(_metric_names(q) for q in _queries(path)))
    assert len(named) > 5, path
    unknown = named - _exported_names()
    assert not unknown, f"{path.name} queries metrics Timbre does not export: {sorted(unknown)}"


def test_dashboard_is_grafana_json_with_a_query_in_every_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    queried = _metric_names(DASHBOARD.read_text())
    for wanted in ("timbre_http_requests_total", "timbre_rpc_client_duration_seconds_bucket",
                   "timbre_messages_dead_lettered_total", "timbre_dead_letter_messages",
                   "timbre_job_duration_seconds_bucket", "timbre_synthesis_audio_seconds_total",
                   "timbre_synthesis_cache_lookups_total", "timbre_quota_refusals_total",
                   "timbre_webhook_deliveries_total"):
        assert wanted in queried, wanted
