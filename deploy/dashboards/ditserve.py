"""ditserve's Grafana dashboards, built with grafana-foundation-sdk (classic dashboard JSON, Grafana 11.6+).

The rendered JSON is committed under charts/ditserve/files/dashboards/ for the Helm chart to ship.
After editing this file, re-render from the repository root:

    python -m deploy.dashboards

tests/cpu/test_dashboards.py fails when the committed JSON differs from what this renders, and when
an expression names a metric that services/runtime/metrics.py does not expose.

Every panel and query reads from the `datasource` variable (any Prometheus), never a fixed uid, and
filters on `instance` (the gateway scrape targets: each one's /metrics has the gateway's series and
its router's). Rates use `$__rate_interval` so they stay correct at any scrape interval.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, StackingMode, TooltipDisplayMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

OUT_DIR = Path(__file__).resolve().parents[2] / "charts" / "ditserve" / "files" / "dashboards"
TAG = "ditserve"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "[$__rate_interval]"
INSTANCE = 'instance=~"$instance"'
STAGE = 'stage=~"$stage"'


# --- PromQL -------------------------------------------------------------------------------------


def _selector(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join([INSTANCE, *matchers])}}}"


def _rate(metric: str, *matchers: str) -> str:
    return f"rate({_selector(metric, *matchers)}{RATE})"


def _quantile(q: float, histogram: str, by: tuple[str, ...] = (), *matchers: str) -> str:
    """q-quantile of a prometheus-client histogram, summed over instances (and everything not in `by`)."""
    labels = ", ".join(("le", *by))
    return f"histogram_quantile({q}, sum by ({labels}) ({_rate(histogram + '_bucket', *matchers)}))"


# --- builders -----------------------------------------------------------------------------------


def _query(expr: str, legend: str) -> PrometheusQuery:
    return PrometheusQuery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def _timeseries(
    title: str, description: str, unit: str, *queries: PrometheusQuery, span: int = 12, height: int = 8
) -> Timeseries:
    panel = (
        Timeseries()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(height)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
        )
        .tooltip(common_builders.VizTooltipOptions().mode(TooltipDisplayMode.MULTI))
    )
    for ref_id, query in zip("ABCDEFGH", queries):
        panel.with_target(query.ref_id(ref_id))
    return panel


def _ratio(title: str, description: str, expr: str, legend: str) -> Timeseries:
    return _timeseries(title, description, "percentunit", _query(expr, legend), span=12).min(0).max(1)


def _quantiles(qs: tuple[float, ...], histogram: str, *matchers: str) -> list[PrometheusQuery]:
    return [_query(_quantile(q, histogram, (), *matchers), f"p{round(q * 100)}") for q in qs]


def _filter(name: str, label: str, query: str) -> QueryVariable:
    """A multi-value filter over one label's values, `All` by default."""
    return (
        QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


def _dashboard(uid: str, title: str, description: str) -> Dashboard:
    dashboard = (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        # an explicit empty list: Grafana adds its built-in annotation query to it on load
        .annotations([])
        .link(
            DashboardLink("ditserve")
            .type(DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    # No saved `current` for the datasource: Grafana then picks the default Prometheus of wherever it runs.
    dashboard.with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
    # queue depth has no labels of its own, so it exists from the first scrape of any gateway
    return dashboard.with_variable(_filter("instance", "Instance", "label_values(ditserve_queue_depth, instance)"))


# --- dashboards ---------------------------------------------------------------------------------


def overview() -> Dashboard:
    requests = "ditserve_requests_total"
    errors = _rate(requests, 'status!="ok"')
    steps = "ditserve_denoise_steps_total"
    board = _dashboard(
        "ditserve-overview",
        "ditserve / Overview",
        "Requests, stage latency, batching and cache hit rates of ditserve gateways and routers.",
    )

    board.with_row(Row("Requests"))
    board.with_panel(
        _timeseries(
            "Request rate by status",
            "Finished requests per second over REST and gRPC, by outcome (`ok` or an error code).",
            "reqps",
            _query(f"sum by (status) ({_rate(requests)})", "{{status}}"),
            span=8,
        ).stacking(common_builders.StackingConfig().mode(StackingMode.NORMAL))
    )
    board.with_panel(
        _timeseries(
            "Error ratio by status",
            "Share of all finished requests that ended in each error code.",
            "percentunit",
            _query(f"sum by (status) ({errors}) / on () group_left sum({_rate(requests)})", "{{status}}"),
            span=8,
        ).min(0)
    )
    board.with_panel(
        _timeseries(
            "Throughput",
            "Images generated per second (the sum of denoiser batch sizes).",
            "suffix: img/s",
            _query(f"sum({_rate('ditserve_batch_size_sum')})", "images"),
            span=8,
        ).min(0)
    )
    board.with_panel(
        _timeseries(
            "Request latency (successful requests)",
            "End-to-end latency seen by the gateway, over all endpoints and models.",
            "s",
            *_quantiles((0.5, 0.9, 0.99), "ditserve_request_seconds", 'status="ok"'),
            span=24,
        )
    )

    board.with_row(Row("Stages"))
    for q in (0.5, 0.9, 0.99):
        board.with_panel(
            _timeseries(
                f"Stage latency p{round(q * 100)}",
                "Latency of one stage call as the router sees it; `router` is the router's wall time for "
                "a whole batch.",
                "s",
                _query(_quantile(q, "ditserve_stage_seconds", ("stage",)), "{{stage}}"),
                span=8,
            )
        )
    board.with_panel(
        _timeseries(
            "Denoising steps/s",
            "Denoising steps per second, by how they ran: `computed` by the transformer or `cached` "
            "(skipped by the DiT cache). A batch's step counts once, whatever its size.",
            "suffix: steps/s",
            _query(f"sum by (kind) ({_rate(steps)})", "{{kind}}"),
        ).stacking(common_builders.StackingConfig().mode(StackingMode.NORMAL))
    )
    board.with_panel(
        _timeseries(
            "Denoising step time",
            "Mean time of one denoising step of a batch (the denoiser call divided by its steps).",
            "s",
            *_quantiles((0.5, 0.9), "ditserve_denoise_step_seconds"),
        )
    )

    board.with_row(Row("Batching"))
    board.with_panel(
        _timeseries(
            "Queue depth",
            "Requests waiting for a denoiser batch, per gateway.",
            "short",
            _query(_selector("ditserve_queue_depth"), "{{instance}}"),
        ).min(0)
    )
    board.with_panel(
        _timeseries(
            "Mean batch size",
            "Images per denoiser batch, averaged over the batches of the interval.",
            "short",
            _query(f"sum({_rate('ditserve_batch_size_sum')}) / sum({_rate('ditserve_batch_size_count')})", "mean"),
        ).min(0)
    )

    board.with_row(Row("Caches"))
    cached = _rate(steps, 'kind="cached"')
    hits, loads = (f"sum({_rate(f'ditserve_lora_{name}_total')})" for name in ("hits", "loads"))
    board.with_panel(
        _ratio(
            "LoRA hit rate",
            "Share of LoRA adapter requests served by an adapter a denoiser replica already had loaded "
            "(hits / (hits + loads)).",
            f"{hits} / ({hits} + {loads})",
            "hit rate",
        )
    )
    board.with_panel(
        _ratio(
            "DiT cache hit rate",
            "Share of denoising steps the DiT cache skipped (cached / all steps).",
            f"sum({cached}) / sum({_rate(steps)})",
            "cached",
        )
    )
    return board


def memory() -> Dashboard:
    gauge, histogram = "ditserve_peak_memory_bytes", "ditserve_request_peak_memory_bytes"
    one_stage = 'stage="$stage"'  # inside a panel repeated over $stage: that panel's stage
    board = _dashboard(
        "ditserve-memory",
        "ditserve / Peak memory",
        "Peak device memory of each stage call, per stage and rank, as reported by the stage workers.",
    )
    board.with_variable(_filter("stage", "Stage", f"label_values({gauge}, stage)"))

    board.with_row(Row("All stages"))
    board.with_panel(
        _timeseries(
            "Peak memory by stage (highest rank, last call)",
            "The largest per-rank peak of the last call of each stage.",
            "bytes",
            _query(f"max by (stage) ({_selector(gauge, STAGE)})", "{{stage}}"),
            span=24,
        ).min(0)
    )

    # One panel per stage (Grafana repeats it for every selected value of $stage), one series per rank.
    board.with_row(Row("Last call, per rank"))
    board.with_panel(
        _timeseries(
            "Peak memory: $stage",
            "Peak device memory of the last call of this stage, per rank (a gauge the router sets on each call).",
            "bytes",
            _query(f"max by (rank) ({_selector(gauge, one_stage)})", "rank {{rank}}"),
            span=8,
        )
        .min(0)
        .repeat("stage")
        .repeat_direction("h")
        .max_per_row(3)
    )

    board.with_row(Row("p90 over calls, per rank"))
    board.with_panel(
        _timeseries(
            "Peak memory p90: $stage",
            "90th percentile of the per-rank peak over the stage calls of the interval. Buckets are powers "
            "of two, so this is exact only to within a factor of two.",
            "bytes",
            _query(_quantile(0.9, histogram, ("rank",), one_stage), "rank {{rank}}"),
            span=8,
        )
        .min(0)
        .repeat("stage")
        .repeat_direction("h")
        .max_per_row(3)
    )
    return board


# --- rendering ----------------------------------------------------------------------------------


def _to_dict(board: Dashboard) -> dict:
    model = board.build()
    # Stable panel ids (Grafana would otherwise assign them on load), so panel links survive a re-render.
    for panel_id, panel in enumerate(model.panels or [], start=1):
        panel.id_val = panel_id
    return json.loads(JSONEncoder().encode(model))


def dashboards() -> dict[str, dict]:
    """File name -> dashboard JSON model."""
    return {f"{board.build().uid}.json": _to_dict(board) for board in (overview(), memory())}


def dumps(dashboard: dict) -> str:
    return json.dumps(dashboard, sort_keys=True, indent=2) + "\n"


def render(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dashboard in dashboards().items():
        path = out_dir / name
        path.write_text(dumps(dashboard))
        paths.append(path)
    return paths
