"""The monitoring assets of ``observability/``: alert rules, Prometheus and Alertmanager
configuration, the Grafana dashboard and the compose file that starts them.

Two layers:

- A schema check in Python (PyYAML, json): the rules' fields and the series they use, the
  dashboard's panels and queries, the compose services, mounts and secrets and how the files
  refer to each other (there is no Docker engine to run the compose file).
- Prometheus' and Alertmanager's own tools from Debian's ``prometheus`` and
  ``prometheus-alertmanager`` packages (``make test`` installs them as root, see
  scripts/setup.sh): ``promtool check rules``, ``promtool check config``, ``promtool test rules``
  on made-up series (each alert fires when it should and not otherwise), every dashboard query
  parsed by promtool, and ``amtool check-config`` / ``config routes test`` / ``template render``.

Whether the series are really exposed by ``GET /metrics`` is checked elsewhere; here they are
the documented list below.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OBS = ROOT / "observability"
ALERTS = OBS / "prometheus" / "alerts.yml"
PROMETHEUS = OBS / "prometheus" / "prometheus.yml"
ALERTMANAGER = OBS / "alertmanager" / "alertmanager.yml"
DASHBOARD = OBS / "grafana" / "nox-dashboard.json"
COMPOSE = OBS / "docker-compose.yml"

# The series GET /metrics exposes, with their labels (besides the target's job and instance).
SERIES: dict[str, frozenset[str]] = {
    "nox_http_requests_total": frozenset({"method", "route", "status"}),
    "nox_runs_total": frozenset({"kind", "status"}),
    "nox_pool_ready_sandboxes": frozenset(),
    "nox_pool_hits_total": frozenset(),
    "nox_pool_misses_total": frozenset(),
    "nox_stems_ready": frozenset(),
    "nox_rate_limited_total": frozenset({"role"}),
    "nox_quota_refused_total": frozenset({"role"}),
    "nox_auth_failures_total": frozenset(),
    "nox_audit_events_total": frozenset({"action", "outcome"}),
    "nox_workspace_storage_bytes": frozenset({"workspace"}),
    "nox_health_status": frozenset({"check"}),
    "nox_disk_free_bytes": frozenset(),
    "nox_build_info": frozenset({"version", "python", "backend"}),
    "process_resident_memory_bytes": frozenset(),
    "process_cpu_seconds_total": frozenset(),
    "process_open_fds": frozenset(),
    "up": frozenset(),
}
HISTOGRAMS: dict[str, frozenset[str]] = {
    "nox_http_request_duration_seconds": frozenset({"method", "route"}),
    "nox_run_duration_seconds": frozenset({"kind"}),
    "nox_run_cpu_seconds": frozenset({"kind"}),
}
TARGET_LABELS = frozenset({"job", "instance"})


def _known_series() -> dict[str, frozenset[str]]:
    known = dict(SERIES)
    for name, labels in HISTOGRAMS.items():
        known[f"{name}_bucket"] = labels | {"le"}
        known[f"{name}_sum"] = labels
        known[f"{name}_count"] = labels
    return {name: labels | TARGET_LABELS for name, labels in known.items()}


KNOWN = _known_series()
REQUIRED_ALERTS = {
    "NoxInstanceDown": "2m",
    "NoxHighErrorRate": "10m",
    "NoxHighLatencyP95": "10m",
    "NoxSandboxUnhealthy": "2m",
    "NoxAuditChainBroken": "0m",
    "NoxDiskNearlyFull": None,  # any duration
}
SEVERITIES = {"warning", "critical"}

# --- a small PromQL reader: which series and labels an expression uses -----------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"\"")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")
_NOT_SERIES = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on"}


class Usage:
    def __init__(self) -> None:
        self.series: set[str] = set()
        self.problems: list[str] = []


def promql_usage(expr: str) -> Usage:
    """The series an expression selects and what is wrong with its names and labels."""
    usage = Usage()
    text = _STRING.sub('""', expr)
    text = _RANGE.sub("", text)
    grouping_labels = {
        label.strip() for group in _GROUPING.findall(text) for label in group.split(",")
    } - {""}
    text = _GROUPING.sub(" ", text)
    for name, matchers in _SELECTOR.findall(text):
        if not name:
            usage.problems.append(f"a selector without a metric name: {{{matchers}}}")
            continue
        for label in _MATCHER.findall(matchers):
            if name in KNOWN and label not in KNOWN[name]:
                usage.problems.append(f"{name} has no label {label!r}")
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    for name, call in _IDENT.findall(text):
        if call or name.lower() in _NOT_SERIES:
            continue  # a function or an aggregation, or a keyword
        usage.series.add(name)
        if name not in KNOWN:
            usage.problems.append(f"unknown series {name!r}")
    labels = set().union(*(KNOWN.get(name, frozenset()) for name in usage.series))
    for label in sorted(grouping_labels - labels):
        usage.problems.append(f"grouping by {label!r}, which none of its series has")
    return usage


def test_the_promql_reader_catches_mistakes() -> None:
    good = promql_usage(
        "histogram_quantile(0.95, sum by (job, le) (rate(nox_http_request_duration_seconds_bucket"
        '{job="nox", route!="/api/history/{execution_id}"}[5m]))) > 1e3 and on (job) up == 1'
    )
    assert good.problems == []
    assert good.series == {"nox_http_request_duration_seconds_bucket", "up"}
    assert promql_usage("rate(nox_http_requests[5m])").problems == [
        "unknown series 'nox_http_requests'"
    ]
    assert promql_usage('nox_runs_total{stauts="ok"}').problems == [
        "nox_runs_total has no label 'stauts'"
    ]
    assert promql_usage("sum by (role) (nox_runs_total)").problems == [
        "grouping by 'role', which none of its series has"
    ]
    assert promql_usage('{__name__="up"}').problems == [
        'a selector without a metric name: {__name__=""}'
    ]


# --- loading ----------------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rules() -> list[dict[str, Any]]:
    doc = _yaml(ALERTS)
    assert isinstance(doc, dict)
    assert set(doc) == {"groups"}
    rules: list[dict[str, Any]] = []
    for group in doc["groups"]:
        assert group["name"]
        assert group["rules"], f"group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


def _dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels of a collapsed row


def _grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus gets it, for the dashboard's variables."""
    for variable, value in (("$instance", ".*"), ("$job", "nox"), ("$__rate_interval", "1m")):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title and refId, expression) of every query."""
    exprs = []
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            exprs.append((f"{panel['title']} {target['refId']}", target["expr"]))
    return exprs


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --- alert rules ------------------------------------------------------------------------------


def test_every_rule_has_the_fields_operators_need() -> None:
    names = []
    for rule in _rules():
        assert "record" not in rule, "only alerts here"
        name = rule["alert"]
        names.append(name)
        assert re.fullmatch(r"Nox[A-Z][A-Za-z0-9]+", name), name
        assert isinstance(rule["expr"], str), name
        assert rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0m"))), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert isinstance(annotations.get(key), str), (name, key)
            assert annotations[key].strip(), (name, key)
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
    assert len(names) == len(set(names)), "alert names repeat"


def test_runbook_links_point_at_existing_sections() -> None:
    for rule in _rules():
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        doc = ROOT / path
        assert doc.is_file(), (rule["alert"], path)
        headings = re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), re.MULTILINE)
        assert anchor in {_slug(h) for h in headings}, (rule["alert"], anchor)


def test_the_required_alerts_exist_with_their_conditions() -> None:
    rules = {rule["alert"]: rule for rule in _rules()}
    assert set(REQUIRED_ALERTS) <= set(rules)
    for name, duration in REQUIRED_ALERTS.items():
        if duration is not None:
            assert str(rules[name].get("for", "0m")) == duration, name
    assert rules["NoxInstanceDown"]["expr"].strip() == 'up{job="nox"} == 0'
    assert rules["NoxAuditChainBroken"]["labels"]["severity"] == "critical"
    assert 'status=~"5.."' in rules["NoxHighErrorRate"]["expr"]
    assert "> 0.05" in rules["NoxHighErrorRate"]["expr"]
    latency = rules["NoxHighLatencyP95"]["expr"]
    assert "histogram_quantile(0.95" in latency
    assert 'route!="/api/logs/stream"' in latency
    assert re.search(r"\)\s*> 1\s*$", latency)
    assert 'check="sandbox"} == 2' in rules["NoxSandboxUnhealthy"]["expr"]
    assert 'check="audit"} == 2' in rules["NoxAuditChainBroken"]["expr"]
    assert 'check="disk"}' in rules["NoxDiskNearlyFull"]["expr"]


def test_rules_use_only_exposed_series_of_the_nox_job() -> None:
    for rule in _rules():
        usage = promql_usage(rule["expr"])
        assert usage.problems == [], (rule["alert"], usage.problems)
        assert usage.series, rule["alert"]
        # Every selector is limited to the nox job, so other jobs' series never fire these.
        selectors = re.findall(r"[a-zA-Z_:][\w:]*\{([^{}]*)\}", _STRING.sub('""', rule["expr"]))
        assert len(selectors) == len(re.findall(r'job="nox"', rule["expr"])), rule["alert"]


# --- Grafana dashboard ------------------------------------------------------------------------


def test_dashboard_is_importable_with_a_datasource_variable() -> None:
    doc = _dashboard()
    assert doc["uid"] == "nox-overview"
    assert 36 <= doc["schemaVersion"] <= 41
    assert doc["id"] is None, "an id would clash on import"
    assert doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "__inputs" not in doc, "the datasource variable replaces import inputs"
    for name in ("job", "instance"):
        variable = variables[name]
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        query = variable["definition"]
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert match, query
        usage = promql_usage(_grafana_to_promql(match.group(1)))
        assert usage.problems == [], (name, usage.problems)
        assert match.group(2) in TARGET_LABELS


def test_dashboard_panels_query_only_exposed_series() -> None:
    seen: set[str] = set()
    for title, expr in _dashboard_exprs():
        usage = promql_usage(_grafana_to_promql(expr))
        assert usage.problems == [], (title, usage.problems)
        assert usage.series, title
        seen |= usage.series
        assert 'job="$job"' in expr, title
        assert 'instance=~"$instance"' in expr, title
    histogram_parts = {f"{name}_bucket" for name in HISTOGRAMS}
    missing = (set(SERIES) - {"up"}) | histogram_parts
    assert missing - seen == set(), "series with no panel"


def test_dashboard_has_the_panels_of_the_issue() -> None:
    exprs = [expr for _title, expr in _dashboard_exprs()]
    joined = "\n".join(exprs)
    for q in ("0.5", "0.95", "0.99"):
        assert re.search(
            rf"histogram_quantile\({q}, sum by \(le\) "
            r"\(rate\(nox_http_request_duration_seconds_bucket\{[^}]*\}\[5m\]\)\)\)",
            joined,
        ), f"latency p{q}"
    assert "sum by (route) (rate(nox_http_requests_total" in joined
    assert 'status=~"5.."' in joined
    assert 'status=~"4.."' in joined
    assert "sum by (status) (rate(nox_runs_total" in joined
    assert "histogram_quantile(0.95, sum by (kind, le) (rate(nox_run_duration_seconds" in joined
    assert "sum by (role) (rate(nox_rate_limited_total" in joined
    assert "sum by (role) (rate(nox_quota_refused_total" in joined
    assert "nox_pool_hits_total" in joined
    assert "nox_pool_misses_total" in joined
    assert "max by (check) (nox_health_status" in joined
    assert "(nox_workspace_storage_bytes" in joined


def test_dashboard_layout_is_well_formed() -> None:
    doc = _dashboard()
    panels = list(_panels(doc["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert panel.get("description"), panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


# --- Prometheus, Alertmanager and compose configuration ---------------------------------------


def _compose() -> dict[str, Any]:
    doc = _yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> file of this repository, for the service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def _secret_paths(compose: dict[str, Any], service: str) -> set[str]:
    return {f"/run/secrets/{name}" for name in compose["services"][service].get("secrets", [])}


def test_compose_starts_the_three_services_under_the_monitoring_profile() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"prometheus", "alertmanager", "grafana"} <= set(services)
    for name in ("prometheus", "alertmanager", "grafana"):
        service = services[name]
        assert "monitoring" in service["profiles"], name
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", service["image"]), "pin a version"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} must listen on loopback only"
        for target, source in _mounts(service).items():
            assert source.is_file(), f"{name} mounts {source}, which is not in the repository"
            assert source.is_relative_to(OBS), source
            assert PurePosixPath(target).is_absolute(), target
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in compose["volumes"], volume


def test_compose_secrets_are_files_kept_out_of_git() -> None:
    compose = _compose()
    ignored = (OBS / ".gitignore").read_text(encoding="utf-8").split()
    assert "/secrets/*" in ignored
    assert "!/secrets/*.example" in ignored
    for name, secret in compose["secrets"].items():
        path = (COMPOSE.parent / secret["file"]).resolve()
        assert path.parent == OBS / "secrets", name
        example = path.with_name(path.name + ".example")
        assert example.is_file(), f"{name}: {example.name} shows what the file holds"
    used = {s for service in compose["services"].values() for s in service.get("secrets", [])}
    assert used == set(compose["secrets"])


def test_prometheus_config_matches_the_compose_file() -> None:
    compose = _compose()
    service = compose["services"]["prometheus"]
    config = _yaml(PROMETHEUS)
    mounts = _mounts(service)
    config_path = next(arg.split("=", 1)[1] for arg in service["command"] if "config.file" in arg)
    assert mounts[config_path] == PROMETHEUS.resolve()
    # rule_files are relative to the configuration file, inside the container too.
    for rule_file in config["rule_files"]:
        in_container = str(PurePosixPath(config_path).parent / rule_file)
        assert mounts[in_container] == (PROMETHEUS.parent / rule_file).resolve(), rule_file
    assert ALERTS.resolve() in mounts.values()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    nox = jobs["nox"]
    assert nox.get("metrics_path", "/metrics") == "/metrics"
    assert nox["authorization"]["credentials_file"] in _secret_paths(compose, "prometheus")
    assert "credentials" not in nox["authorization"], "the token belongs in a file"
    targets = [t for static in nox["static_configs"] for t in static["targets"]]
    assert targets == ["host.docker.internal:8080"]
    assert "host.docker.internal:host-gateway" in service["extra_hosts"]
    alertmanagers = config["alerting"]["alertmanagers"]
    am_targets = [t for am in alertmanagers for s in am["static_configs"] for t in s["targets"]]
    assert am_targets == ["alertmanager:9093"]


def test_alertmanager_routes_by_severity_with_secrets_in_files() -> None:
    compose = _compose()
    config = _yaml(ALERTMANAGER)
    service = compose["services"]["alertmanager"]
    mounts = _mounts(service)
    config_path = next(arg.split("=", 1)[1] for arg in service["command"] if "config.file" in arg)
    assert mounts[config_path] == ALERTMANAGER.resolve()
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    routes = {tuple(route["matchers"]): route["receiver"] for route in config["route"]["routes"]}
    critical = receivers[routes[('severity="critical"',)]]
    warning = receivers[routes[('severity="warning"',)]]
    assert critical["email_configs"]
    assert critical["slack_configs"]
    assert warning["slack_configs"]
    assert "email_configs" not in warning
    assert config["route"]["receiver"] in receivers
    secrets = _secret_paths(compose, "alertmanager")
    for receiver in receivers.values():
        for slack in receiver.get("slack_configs", []):
            assert "api_url" not in slack, "the webhook URL belongs in a file"
            assert slack["api_url_file"] in secrets
        for email in receiver.get("email_configs", []):
            assert email["to"].endswith("@example.com"), "placeholders only"
    smtp = config["global"]
    assert smtp["smtp_smarthost"].split(":")[0].endswith("example.com")
    assert smtp["smtp_from"].endswith("@example.com")
    assert "smtp_auth_password" not in smtp
    assert smtp["smtp_auth_password_file"] in secrets


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    compose = _compose()
    service = compose["services"]["grafana"]
    mounts = _mounts(service)
    dashboards = {t: s for t, s in mounts.items() if s.suffix == ".json"}
    assert list(dashboards.values()) == [DASHBOARD.resolve()]
    dashboard_dir = str(PurePosixPath(next(iter(dashboards))).parent)
    provisioning = {
        t: _yaml(s) for t, s in mounts.items() if t.startswith("/etc/grafana/provisioning/")
    }
    kinds = {PurePosixPath(t).parent.name: doc for t, doc in provisioning.items()}
    assert set(kinds) == {"datasources", "dashboards"}
    (datasource,) = kinds["datasources"]["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True
    (provider,) = kinds["dashboards"]["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == dashboard_dir


# --- Prometheus' and Alertmanager's own tools -------------------------------------------------


def _tool(name: str) -> str:
    binary = shutil.which(name)
    assert binary, (
        f"{name} is needed (make test installs it: apt-get install prometheus "
        "prometheus-alertmanager)"
    )
    return binary


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_promtool_checks_the_rules() -> None:
    out = _run([_tool("promtool"), "check", "rules", "alerts.yml"], ALERTS.parent)
    assert f"SUCCESS: {len(_rules())} rules found" in out


def test_promtool_checks_the_config(tmp_path: Path) -> None:
    # The credentials file only exists in the container: point it at a stand-in.
    token = tmp_path / "nox_metrics_token"
    token.write_text("a-scrape-token-for-the-check\n")
    text = PROMETHEUS.read_text(encoding="utf-8")
    assert text.count("/run/secrets/nox_metrics_token") == 1
    (tmp_path / "prometheus.yml").write_text(
        text.replace("/run/secrets/nox_metrics_token", str(token))
    )
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    out = _run([_tool("promtool"), "check", "config", "prometheus.yml"], tmp_path)
    assert "SUCCESS: 1 rule files found" in out


def _alert(name: str, instance: str, severity: str, **labels: str) -> dict[str, Any]:
    return {
        "exp_labels": {
            "alertname": name,
            "job": "nox",
            "instance": instance,
            "severity": severity,
            **labels,
        }
    }


def _rule_unit_tests() -> list[dict[str, Any]]:
    """Made-up series (one sample a minute) and the alerts they must raise."""
    http = "nox_http_requests_total"
    bucket = "nox_http_request_duration_seconds_bucket"
    health = "nox_health_status"
    nox = 'job="nox", instance="{i}"'

    def series(name: str, values: str, instance: str = "a:8080", **labels: str) -> dict[str, str]:
        extra = "".join(f', {k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{nox.format(i=instance)}{extra}}}", "values": values}

    def slow(instance: str, route: str, le_values: dict[str, str]) -> list[dict[str, str]]:
        return [
            series(bucket, v, instance, method="GET", route=route, le=le)
            for le, v in le_values.items()
        ]

    fast = {"0.5": "0+10x30", "1": "0+10x30", "2.5": "0+10x30", "+Inf": "0+10x30"}
    two_seconds = {"0.5": "0x30", "1": "0x30", "2.5": "0+10x30", "+Inf": "0+10x30"}
    hanging = {"0.5": "0x30", "1": "0x30", "2.5": "0x30", "+Inf": "0+1x30"}
    return [
        {  # an instance that stops answering; one that keeps answering
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="nox", instance="a:8080"}', "values": "1 1 0 0 0 0 0 0"},
                {"series": 'up{job="nox", instance="b:8080"}', "values": "1x8"},
                {"series": 'up{job="other", instance="c:9100"}', "values": "0x8"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "NoxInstanceDown", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "NoxInstanceDown",
                    "exp_alerts": [_alert("NoxInstanceDown", "a:8080", "critical")],
                },
            ],
        },
        {  # 9% server errors; 1.6%; an idle server whose rare requests all fail
            "interval": "1m",
            "input_series": [
                series(http, "0+60x30", method="GET", route="/api/me", status="200"),
                series(http, "0+6x30", method="POST", route="/run_py", status="500"),
                series(http, "0+60x30", "b:8080", method="GET", route="/api/me", status="200"),
                series(http, "0+1x30", "b:8080", method="POST", route="/run_py", status="503"),
                series(http, "0x30", "c:8080", method="GET", route="/api/me", status="200"),
                series(http, "0+0.2x30", "c:8080", method="POST", route="/run_py", status="500"),
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "NoxHighErrorRate", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "NoxHighErrorRate",
                    "exp_alerts": [_alert("NoxHighErrorRate", "a:8080", "warning")],
                },
            ],
        },
        {  # requests of 2 s on a; on b only the log stream hangs (left out)
            "interval": "1m",
            "input_series": [
                *slow("a:8080", "/run_py", two_seconds),
                *slow("b:8080", "/api/me", fast),
                *slow("b:8080", "/api/logs/stream", hanging),
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "NoxHighLatencyP95", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "NoxHighLatencyP95",
                    "exp_alerts": [_alert("NoxHighLatencyP95", "a:8080", "warning")],
                },
            ],
        },
        {  # health: sandbox fails on a, only degraded on b; audit breaks on a; disks
            "interval": "1m",
            "input_series": [
                series(health, "0 0 2 2 2 2 2 2 2 2", check="sandbox"),
                series(health, "1x10", "b:8080", check="sandbox"),
                series(health, "0 2 2 2 2 2 2 2 2 2", check="audit"),
                series(health, "1x10", "b:8080", check="audit"),
                series(health, "0 1 1 1 1 1 1 1 1 1", check="disk"),
                series(health, "2x10", "b:8080", check="disk"),
                series(health, "0 2 2 2 2 2 2 2 2 2", check="database"),
                series(health, "0 1 1 1 1 1 1 1 1 1", "b:8080", check="policy"),
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "NoxSandboxUnhealthy", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "NoxSandboxUnhealthy",
                    "exp_alerts": [
                        _alert("NoxSandboxUnhealthy", "a:8080", "critical", check="sandbox")
                    ],
                },
                {
                    "eval_time": "1m",
                    "alertname": "NoxAuditChainBroken",
                    "exp_alerts": [
                        _alert("NoxAuditChainBroken", "a:8080", "critical", check="audit")
                    ],
                },
                {
                    "eval_time": "8m",
                    "alertname": "NoxDiskNearlyFull",
                    "exp_alerts": [
                        _alert("NoxDiskNearlyFull", "a:8080", "warning", check="disk"),
                        _alert("NoxDiskNearlyFull", "b:8080", "warning", check="disk"),
                    ],
                },
                {
                    "eval_time": "8m",
                    "alertname": "NoxDiskFull",
                    "exp_alerts": [_alert("NoxDiskFull", "b:8080", "critical", check="disk")],
                },
                {
                    "eval_time": "8m",
                    "alertname": "NoxDatabaseUnhealthy",
                    "exp_alerts": [
                        _alert("NoxDatabaseUnhealthy", "a:8080", "critical", check="database")
                    ],
                },
                {
                    "eval_time": "8m",
                    "alertname": "NoxPolicyReloadRefused",
                    "exp_alerts": [
                        _alert("NoxPolicyReloadRefused", "b:8080", "warning", check="policy")
                    ],
                },
            ],
        },
    ]


def test_promtool_alerts_fire_when_they_should(tmp_path: Path) -> None:
    # promtool compares annotations too; they are checked above, so test the rules without them.
    doc = _yaml(ALERTS)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = _rule_unit_tests()
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in _rules()}, "every alert has a unit test"
    unit = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    out = _run([_tool("promtool"), "test", "rules", "alerts_test.yml"], tmp_path)
    assert "SUCCESS" in out


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"nox:dashboard_query_{i}", "expr": _grafana_to_promql(expr)}
        for i, (_title, expr) in enumerate(_dashboard_exprs())
    ]
    doc = {"groups": [{"name": "dashboard", "rules": rules}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    out = _run([_tool("promtool"), "check", "rules", "dashboard_rules.yml"], tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_amtool_checks_the_config_and_the_routes() -> None:
    amtool = _tool("amtool")
    out = _run([amtool, "check-config", "alertmanager.yml"], ALERTMANAGER.parent)
    assert "SUCCESS" in out
    config = _yaml(ALERTMANAGER)
    critical, warning = (
        next(r["receiver"] for r in config["route"]["routes"] if r["matchers"] == [m])
        for m in ('severity="critical"', 'severity="warning"')
    )
    for labels, receiver in (
        (["severity=critical", "alertname=NoxAuditChainBroken"], critical),
        (["severity=warning", "alertname=NoxHighLatencyP95"], warning),
    ):
        out = _run(
            [amtool, "config", "routes", "test", "--config.file=alertmanager.yml", *labels],
            ALERTMANAGER.parent,
        )
        assert out.splitlines()[0].strip() == receiver, (labels, out)


def test_amtool_renders_the_slack_messages(tmp_path: Path) -> None:
    amtool = _tool("amtool")
    empty = tmp_path / "none.tmpl"
    empty.write_text("")
    config = _yaml(ALERTMANAGER)
    for receiver in config["receivers"]:
        for slack in receiver.get("slack_configs", []):
            for field in ("title", "text"):
                _run(
                    [amtool, "template", "render", f"--template.glob={empty}",
                     f"--template.text={slack[field]}"],
                    tmp_path,
                )  # fmt: skip
