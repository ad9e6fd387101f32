"""Grafana dashboards (deploy/dashboards/): the committed JSON is what the code renders, every PromQL
expression names only series that /metrics exposes, and every query reads from the datasource variable."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from deploy.dashboards import OUT_DIR, dashboards, dumps
from services.runtime import metrics

RERENDER = "re-render with `python -m deploy.dashboards` and commit the JSON"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Sample-name suffixes prometheus-client exposes per metric type (`_created` left out: dashboards must not
# depend on it, and PROMETHEUS_DISABLE_CREATED_SERIES turns it off).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev"}
RANGE_FUNCTIONS = {"rate", "irate", "increase", "delta", "deriv", "avg_over_time", "max_over_time", "min_over_time"}
OTHER_FUNCTIONS = {"histogram_quantile", "abs", "absent", "ceil", "floor", "round", "clamp_min", "clamp_max", "vector"}
PROMQL_FUNCTIONS = AGGREGATIONS | RANGE_FUNCTIONS | OTHER_FUNCTIONS
GROUPING_KEYWORDS = ("by", "without", "on", "ignoring", "group_left", "group_right")  # (...) after them: labels
GROUPING = re.compile(rf"\b(?:{'|'.join(GROUPING_KEYWORDS)})\s*\(([^)]*)\)")
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", *GROUPING_KEYWORDS}
# Labels Prometheus adds when it scrapes, and the histogram bucket label.
SCRAPE_LABELS = {"job", "instance", "le"}


def _registries() -> list[CollectorRegistry]:
    return [r for r in vars(metrics).values() if isinstance(r, CollectorRegistry)]


def _exposed_series() -> set[str]:
    """Sample names GET /metrics can carry, derived from the registries (labelled families have no
    samples until first observed, so names come from each family's type)."""
    names = set()
    for registry in _registries():
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
            names.update(sample.name for sample in family.samples if not sample.name.endswith("_created"))
    return names


def _label_names() -> set[str]:
    # prometheus-client keeps declared label names only on the metric objects (private attribute)
    declared = (m._labelnames for m in vars(metrics).values() if isinstance(m, MetricWrapperBase))
    return SCRAPE_LABELS.union(*declared)


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows carry their panels
    return panels


def _expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"] if isinstance(variable["query"], str) else variable["query"]["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, f"variable {variable['name']}: unexpected query {query!r}"
            exprs.append(f"sum by ({m[2]}) ({m[1]})")  # the same names, as PromQL
    return exprs


def _names_in(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(metric names, label names, function names) of a PromQL expression with Grafana variables."""
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, regexes
    rest = re.sub(r"\[[^\]]*\]", "", rest)  # range windows
    rest = re.sub(r"\$\{?\w+\}?", "", rest)  # Grafana variables outside strings
    labels: set[str] = set()
    for block in re.findall(r"\{([^}]*)\}", rest):
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", block))
    rest = re.sub(r"\{[^}]*\}", " ", rest)
    for block in GROUPING.findall(rest):
        labels.update(re.findall(r"[a-zA-Z_]\w*", block))
    rest = GROUPING.sub(" ", rest)
    functions = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\s*\(", rest))
    rest = re.sub(r"\b[a-zA-Z_:][\w:]*\s*\(", "(", rest)
    rest = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", " ", rest)
    names = set(re.findall(r"[a-zA-Z_:][\w:]*", rest)) - PROMQL_KEYWORDS
    return names, labels, functions


RENDERED = dashboards()


def test_committed_json_is_rendered_from_code():
    committed = {p.name for p in OUT_DIR.glob("*.json")}
    assert committed == set(RENDERED), f"dashboard files differ from what the code renders: {RERENDER}"
    for name, dashboard in RENDERED.items():
        assert (OUT_DIR / name).read_text() == dumps(dashboard), f"{name} is stale: {RERENDER}"
    assert {n: dumps(d) for n, d in dashboards().items()} == {n: dumps(d) for n, d in RENDERED.items()}, (
        "rendering is not deterministic"
    )


def test_name_parser_sees_every_kind_of_name():
    expr = (
        'histogram_quantile(0.9, sum by (le, stage) (rate(foo_bucket{instance=~"$instance", stage!="a b"}'
        "[$__rate_interval]))) / on () group_left bar + 2"
    )
    assert _names_in(expr) == (
        {"foo_bucket", "bar"},
        {"le", "stage", "instance"},
        {"histogram_quantile", "sum", "rate"},
    )


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_expressions_name_only_exposed_series(name):
    exposed, known_labels = _exposed_series(), _label_names()
    assert "ditserve_requests_total" in exposed and "ditserve_stage_seconds_bucket" in exposed  # the derivation works
    exprs = _expressions(RENDERED[name])
    assert exprs
    for expr in exprs:
        names, labels, functions = _names_in(expr)
        assert names, expr
        assert names <= exposed, f"{expr}\nnames series /metrics does not expose: {sorted(names - exposed)}"
        assert labels <= known_labels, f"{expr}\nunknown labels: {sorted(labels - known_labels)}"
        assert functions <= PROMQL_FUNCTIONS, f"{expr}\nunknown functions: {sorted(functions - PROMQL_FUNCTIONS)}"
        windows = re.findall(r"\[[^\]]*\]", expr)
        assert set(windows) <= {"[$__rate_interval]"}, expr
    for panel in _panels(RENDERED[name]):
        for target in panel.get("targets", []):
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: not filtered by $instance"


def _walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_every_query_reads_from_the_datasource_variable(name):
    dashboard = RENDERED[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "current" not in variables["datasource"], "a saved current datasource pins one Grafana's uid"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for path, key, value in _walk(dashboard):
        if key == "datasource":
            assert value == DATASOURCE, path
        if key == "uid" and path != ".uid":
            assert value == "${datasource}", f"{path}: hard-coded uid {value!r}"


def test_dashboards_have_uids_titles_and_unique_panel_ids():
    uids = [d["uid"] for d in RENDERED.values()]
    assert len(set(uids)) == len(uids)
    for name, dashboard in RENDERED.items():
        assert name == f"{dashboard['uid']}.json"
        assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])  # Grafana's uid limit is 40 characters
        assert dashboard["title"].startswith("ditserve")
        panels = _panels(dashboard)
        assert all(p.get("title") for p in panels)
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids), name
