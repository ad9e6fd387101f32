"""Grafana dashboards as code; `python -m deploy.dashboards` re-renders the chart's JSON (see ditserve.py)."""

from deploy.dashboards.ditserve import OUT_DIR, dashboards, dumps, render

__all__ = ["OUT_DIR", "dashboards", "dumps", "render"]
