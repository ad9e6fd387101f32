"""The `serve` part of values.schema.json, generated from ditserve's ServeConfig
(services/runtime/config.py): the chart's `serve` values are checked by the same schema that
`ditserve serve --config` and the Ray Serve app builder validate with.

    python charts/ditserve/values_schema.py           # rewrite values.schema.json in place
    python charts/ditserve/values_schema.py --check   # exit 1 if it is stale (tests do this)

Generated definitions are the `$defs` named `ditserve.*`; everything else in the file (the
Kubernetes values) is written by hand and kept as it is. A few ServeConfig fields are the
chart's to set, so they are left out and setting them in values is a schema error: host and
the ports (`ports`), ray / ray_address (`mode`), and the stages' `address` (standalone mode
points the gateway at each stage's Service). Not packaged with the chart (.helmignore)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parent
SCHEMA_FILE = CHART / "values.schema.json"
PREFIX = "ditserve."
CHART_OWNED = {"ServeConfig": ("host", "port", "grpc_port", "ray", "ray_address"),
               "EncoderEndpoint": ("address",), "DenoiserEndpoint": ("address",), "VaeEndpoint": ("address",)}


def serve_defs() -> dict:
    """ServeConfig's JSON schema as `$defs` entries (the root one is `ditserve.ServeConfig`)."""
    sys.path.insert(0, str(CHART.parents[1]))
    from services.runtime.config import ServeConfig

    schema = ServeConfig.model_json_schema(ref_template="#/$defs/" + PREFIX + "{model}")
    defs = {PREFIX + name: body for name, body in schema.pop("$defs").items()}
    defs[PREFIX + "ServeConfig"] = schema
    for model, fields in CHART_OWNED.items():
        for field in fields:
            del defs[PREFIX + model]["properties"][field]
    return dict(sorted(defs.items()))


def with_serve_defs(values_schema: dict) -> dict:
    defs = {k: v for k, v in values_schema.get("$defs", {}).items() if not k.startswith(PREFIX)}
    return {**values_schema, "$defs": {**defs, **serve_defs()}}


def render(values_schema: dict) -> str:
    return json.dumps(values_schema, indent=2) + "\n"


if __name__ == "__main__":
    current = SCHEMA_FILE.read_text()
    fresh = render(with_serve_defs(json.loads(current)))
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if fresh == current else f"{SCHEMA_FILE} is stale: run python {sys.argv[0]}")
    SCHEMA_FILE.write_text(fresh)
