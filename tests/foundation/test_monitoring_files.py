"""The shipped monitoring files (deploy/prometheus, deploy/grafana) are valid and name only real metrics.

promtool (Debian's ``prometheus`` package) checks the rules, the config and the rules' unit tests
when it is installed; the schema and metric-name checks run everywhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from app.core import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
CONFIG = PROMETHEUS / "prometheus.yml"
ALERT_TESTS = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "salesmsg-connect.json"
APP_SOURCE = "\n".join(path.read_text() for path in (ROOT / "app").rglob("*.py"))

SEVERITIES = {"page", "ticket"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")

# Series Prometheus itself adds to every target.
BUILTIN_SERIES = {"up"}
TARGET_LABELS = {"job", "instance"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "inf", "nan"}


def _exported() -> dict[str, set[str]]:
    """Every series name app.core.metrics exports, with the labels it may carry."""
    series: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, kind, labels = value._name, value._type, set(value._labelnames)
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        else:
            series[name] = labels
    return series


EXPORTED = _exported()


def _alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    def walk(panels: list[dict]) -> list[str]:
        found = []
        for panel in panels:
            found += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
            found += walk(panel.get("panels", []))
        return found

    return walk(json.loads(DASHBOARD.read_text())["panels"])


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{((?:[^{}\"]|\"(?:[^\"\\]|\\.)*\")*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def _series(expr: str) -> tuple[set[str], list[tuple[str, str, str, str]]]:
    """The series names an expression reads, and its label matchers as (series, label, op, value)."""
    matchers = [(m.group(1) or "", *mm.groups()) for m in _SELECTOR.finditer(expr) for mm in _MATCHER.finditer(m.group(2))]
    bare = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", expr)
    bare = re.sub(r"\"(?:[^\"\\]|\\.)*\"", " ", bare)  # strings
    bare = re.sub(r"\[[^\]]*\]", " ", bare)  # ranges, $__rate_interval
    bare = _LABEL_LIST.sub(" ", bare)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", bare):
        word = match.group(1)
        if word.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", word):
            names.add(word)
    return names, matchers


def _check_expr(expr: str, where: str) -> set[str]:
    names, matchers = _series(expr)
    assert names, f"{where}: no series in {expr!r}"
    unknown = names - EXPORTED.keys() - BUILTIN_SERIES
    assert not unknown, f"{where}: not exported by app.core.metrics: {sorted(unknown)} in {expr!r}"
    for series, label, op, value in matchers:
        if series in EXPORTED:
            assert label in EXPORTED[series] | TARGET_LABELS, f"{where}: {series} has no label {label!r}"
        if label in ("outcome", "reason", "route") and op in ("=", "=~"):
            for option in value.split("|") if op == "=~" else [value]:
                literal = option.replace("\\\\", "\\").replace("\\{", "{").replace("\\}", "}")
                literal = literal.removeprefix("refused_") if series.startswith("smc_upstream_budget") else literal
                if not re.search(r"[$.*+?()\[\]]", literal):  # a plain value: the app must use it somewhere
                    assert f'"{literal}"' in APP_SOURCE or f"'{literal}'" in APP_SOURCE, (
                        f"{where}: {label}={option!r} is never set by the app"
                    )
    return names


# -- schema ---------------------------------------------------------------------------------------


def test_alert_rules_follow_the_schema():
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    seen: set[str] = set()
    for group in document["groups"]:
        assert isinstance(group.get("name"), str) and group["name"], group
        assert isinstance(group.get("rules"), list) and group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            name = rule.get("alert")
            assert isinstance(name, str) and re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), f"not an alert: {rule}"
            assert name not in seen, f"alert {name} is defined twice"
            seen.add(name)
            assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), name
            assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: for is a duration"
            assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity one of {SEVERITIES}"
            annotations = rule.get("annotations", {})
            assert annotations.get("summary", "").strip(), f"{name}: no summary"
            assert len(annotations.get("description", "")) > 40, f"{name}: the description says what to do"
    # what needs a person is covered
    for required in ("SmcConnectionMarkedDead", "SmcRefreshFailing", "SmcUpstreamLockout", "SmcBudgetRefusingCalls",
                     "SmcAuditQueueFull", "SmcProxy5xxRate", "SmcDatabaseUnavailable", "SmcProxyLatencyHigh"):
        assert required in seen, f"no {required} alert"


def test_prometheus_config_scrapes_metrics_and_loads_the_rules():
    config = yaml.safe_load(CONFIG.read_text())
    assert "alerts.yml" in config["rule_files"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "salesmsg-connect"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    health = (ROOT / "app" / "api" / "health.py").read_text()
    assert '@router.get("/metrics")' in health
    assert 'job="salesmsg-connect"' in ALERTS.read_text()


def test_dashboard_is_an_importable_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
    for metric in ("smc_upstream_budget_total", "smc_upstream_budget_queued", "smc_upstream_budget_wait_seconds_bucket",
                   "smc_upstream_budget_lockouts_total", "smc_refresh_total", "smc_proxy_denials_total",
                   "smc_upstream_responses_total", "smc_webhook_deliveries_total", "smc_http_request_seconds_bucket"):
        assert any(metric in expr for expr in _dashboard_exprs()), f"no panel shows {metric}"


# -- metric names ---------------------------------------------------------------------------------


def test_the_metric_name_check_catches_a_renamed_metric():
    with pytest.raises(AssertionError, match="not exported"):
        _check_expr('sum(rate(smc_refreshes_total{outcome="dead"}[5m]))', "probe")
    with pytest.raises(AssertionError, match="has no label"):
        _check_expr('sum(rate(smc_refresh_total{result="dead"}[5m]))', "probe")
    with pytest.raises(AssertionError, match="never set"):
        _check_expr('sum(rate(smc_proxy_denials_total{reason="no_such_reason_anywhere"}[5m]))', "probe")
    assert _check_expr(
        'histogram_quantile(0.9, sum by (le) (rate(smc_upstream_budget_wait_seconds_bucket{job=~"$job"}[$__rate_interval])))',
        "probe",
    ) == {"smc_upstream_budget_wait_seconds_bucket"}


def test_every_metric_in_the_alerts_is_exported():
    used: set[str] = set()
    for rule in _alert_rules():
        used |= _check_expr(rule["expr"], rule["alert"])
    assert {"smc_refresh_total", "smc_upstream_budget_lockouts_total", "smc_proxy_denials_total"} <= used


def test_every_metric_on_the_dashboard_is_exported():
    exprs = _dashboard_exprs()
    assert exprs
    used: set[str] = set()
    for expr in exprs:
        used |= _check_expr(expr, "dashboard")
    assert used - BUILTIN_SERIES, "the dashboard shows no app metric"


# -- promtool -------------------------------------------------------------------------------------


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config():
    assert "SUCCESS" in _promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in _promtool("check", "config", str(CONFIG))


@needs_promtool
def test_promtool_accepts_the_dashboard_queries(tmp_path: Path):
    """The dashboard's PromQL parses: checked as recording rules, Grafana's variables filled in."""
    rules = []
    for n, expr in enumerate(_dashboard_exprs()):
        filled = expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$job", ".*").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{n}", "expr": filled})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert "SUCCESS" in _promtool("check", "rules", str(path))


@needs_promtool
def test_promtool_unit_tests_fire_the_alerts(tmp_path: Path):
    """alerts_test.yml against the rules without their annotations (promtool compares those exactly)."""
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(document))
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    tested = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert {"SmcUpstreamLockout", "SmcConnectionMarkedDead", "SmcRefreshFailing"} <= tested
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yml")
    assert "SUCCESS" in _promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
