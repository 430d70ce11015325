"""The shipped Grafana dashboard and Prometheus alert rules against a real daemon.

A `coverwatch serve --source kafka` daemon processes a stream from the test broker; its
/metrics is scraped over HTTP and, where Debian's `prometheus` package is installed, by a real
Prometheus server on 127.0.0.1 that also loads the alert rules. Every metric name and
grouping label in the dashboard's and the rules' queries must exist in the exporter's output,
every dashboard query must evaluate, and the rules must pass `promtool check rules` and
their own unit tests (systemd/coverwatch-alerts.test.yml).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.service.metrics import Metrics
from tests.conftest import melody
from tests.daemon import Daemon, free_port, send_stream, wait_for, write_config

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
DASHBOARD = SYSTEMD / "grafana-dashboard.json"
ALERTS = SYSTEMD / "coverwatch-alerts.yml"
ALERT_TESTS = SYSTEMD / "coverwatch-alerts.test.yml"
CHUNK_S = 0.5
EAGER_DECISION = "start_threshold = -0.5\nend_threshold = -0.9\n"
# Names a query may use that the daemon does not export itself.
SCRAPE_NAMES = {"up"}
SCRAPE_LABELS = {"instance", "job", "le"}
METRIC_NAME = re.compile(r"\b((?:coverwatch|process)_[a-z0-9_]+|up)\b(?!\s*\()")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
MATCHER_LABEL = re.compile(r"([a-z_][a-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def dashboard_queries() -> list[tuple[str, str]]:
    """[(panel title, PromQL expression)] of every panel target."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["expr"]) for group in rules["groups"] for r in group["rules"]]


def as_prometheus_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced as Grafana would."""
    return expr.replace("$__rate_interval", "15s").replace('=~"$instance"', '=~".*"')


def exported(metrics_text: str) -> tuple[dict[str, set[str]], set[str]]:
    """({sample name: label names}, names with at least one sample) from a /metrics page.

    prometheus_client lists a labelled metric with no children yet (say, dead letters before
    the first one) by its HELP/TYPE lines only: its sample names are derived from the type."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"), "info": ("_info",)}
    names: dict[str, set[str]] = {}
    with_samples: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
            with_samples.add(sample.name)
    return names, with_samples


def declared_label_names() -> set[str]:
    """Label names the daemon's metrics declare. A labelled metric without children yet (no
    dead letter so far) shows no label names in /metrics, so they come from its definition."""
    metrics = Metrics()
    return {label for collector in vars(metrics).values() for label in getattr(collector, "_labelnames", ())}


def referenced(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names used for grouping or matching) in a PromQL expression."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    labels = {label.strip() for group in GROUPING.findall(without_strings) for label in group.split(",") if label.strip()}
    labels |= set(MATCHER_LABEL.findall(expr))
    names = set(METRIC_NAME.findall(without_strings)) - labels
    return names, labels


@pytest.fixture()
def serving_daemon(kafka_broker, make_topic, random_model_dir, index_dir, tmp_path):
    """(daemon, its audio topic): a daemon that has processed 25 s of one stream and emitted match events."""
    topic = make_topic(1)
    config = write_config(
        tmp_path / "d.toml", kafka_broker.bootstrap, topic, f"{topic}.events", f"g-{uuid.uuid4().hex[:8]}", free_port(), EAGER_DECISION
    )
    audio = melody(3, 25.0)
    with Daemon(tmp_path, "d", config, random_model_dir, index_dir) as daemon:
        send_stream(kafka_broker.bootstrap, topic, "station-1", audio, SAMPLE_RATE, CHUNK_S)
        wait_for(lambda: daemon.metric("coverwatch_match_events_total{event=match_start}") >= 1, 90, "no match event", daemon)
        yield daemon, topic


def scrape(daemon: Daemon) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_dashboard_and_alerts_use_only_exported_metrics_and_labels(serving_daemon):
    names, _ = exported(scrape(serving_daemon[0]))
    assert "coverwatch_dead_letters_total" in names  # listed before any chunk is dead-lettered
    known_labels = SCRAPE_LABELS | {label for labels in names.values() for label in labels} | declared_label_names()
    queries = dashboard_queries() + alert_queries()
    assert len(dashboard_queries()) >= 20 and len(alert_queries()) >= 10
    problems = []
    for title, expr in queries:
        used_names, used_labels = referenced(expr)
        assert used_names, f"{title}: no metric found in {expr!r}"
        problems += [f"{title}: metric {n} is not exported" for n in used_names - names.keys() - SCRAPE_NAMES]
        problems += [f"{title}: label {label} exists on no exported metric" for label in used_labels - known_labels]
    assert not problems, "\n".join(problems)


def test_a_misspelt_metric_is_caught(serving_daemon):
    """The name check itself: an expression with a wrong name or label is reported."""
    names, _ = exported(scrape(serving_daemon[0]))
    used_names, used_labels = referenced('sum by (statoin) (rate(coverwatch_chunk_total{outcome="processed"}[5m]))')
    assert used_names == {"coverwatch_chunk_total"} and used_names - names.keys() == {"coverwatch_chunk_total"}
    assert used_labels == {"statoin", "outcome"}


def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian package prometheus)")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_queries())} rules found" in check.stdout
    unit = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=SYSTEMD, capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_dashboard_and_rules_evaluate_on_a_real_prometheus(serving_daemon, kafka_broker, tmp_path):
    """Prometheus scrapes the daemon every second and loads the alert rules. Each dashboard
    query evaluates, and returns series wherever the metrics it reads have samples; each rule
    evaluates without error."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is missing (Debian package prometheus)")
    daemon, topic = serving_daemon
    _, with_samples = exported(scrape(daemon))
    port = free_port()
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    (tmp_path / "prometheus.yml").write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{ALERTS.name}]
scrape_configs:
  - job_name: coverwatch
    static_configs: [{{targets: ["127.0.0.1:{daemon.port}"]}}]
"""
    )
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def api(path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{port}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # a bad query answers 400 with a JSON body
            return json.loads(error.read())
        except OSError:
            return {}

    def query(expr: str) -> list:
        answer = api("query", query=expr)
        assert answer.get("status") == "success", f"{expr!r}: {answer}"
        return answer["data"]["result"]

    try:
        wait_for(lambda: api("query", query="up").get("data", {}).get("result"), 60, "Prometheus never scraped the daemon")
        def scraped_samples() -> int:
            result = api("query", query="coverwatch_index_songs[20s]").get("data", {}).get("result")
            return len(result[0]["values"]) if result else 0

        # the dashboard's 15-s rate windows need a few scrapes, while audio flows
        wait_for(lambda: scraped_samples() >= 4, 60, "Prometheus has too few samples")
        send_stream(kafka_broker.bootstrap, topic, "station-2", melody(4, 15.0), SAMPLE_RATE, CHUNK_S)
        wait_for(lambda: api("query", query="rate(coverwatch_audio_seconds_total[15s]) > 0").get("data", {}).get("result"), 60,
                 "Prometheus never saw the second stream's audio")  # fmt: skip
        wait_for(lambda: scraped_samples() >= 8, 60, "Prometheus has too few samples")
        assert float(query('up{job="coverwatch"}')[0]["value"][1]) == 1
        empty = []
        for title, expr in dashboard_queries():
            result = query(as_prometheus_query(expr))
            used_names, _ = referenced(expr)
            if not result and used_names <= with_samples | SCRAPE_NAMES:
                empty.append(f"{title}: {expr}")
        assert not empty, "queries without series although their metrics have samples:\n" + "\n".join(empty)
        songs = query(as_prometheus_query(next(e for t, e in dashboard_queries() if t == "Songs in the index")))
        assert float(songs[0]["value"][1]) == daemon.metric("coverwatch_index_songs") > 0

        def rules_evaluated() -> list:
            rules = [r for g in api("rules").get("data", {}).get("groups", []) for r in g["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []

        rules = wait_for(rules_evaluated, 30, "the alert rules were never evaluated")
        assert len(rules) == len(alert_queries())
        unhealthy = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
        assert not unhealthy, unhealthy
        # a healthy daemon that just processed audio: none of the page alerts is pending
        firing = [a["labels"]["alertname"] for a in api("alerts")["data"]["alerts"] if a["labels"].get("severity") == "page"]
        assert not firing, firing
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
