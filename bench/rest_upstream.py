"""A fast canned TF Serving REST API for the REST benchmark (its own process).

Every answer is written once at startup with the local backend's TF Serving JSON
writer (``json_tensor.cc``'s layout, row format): a call costs only aiohttp's own
work, so the proxies in front of it dominate the measurement. Two models:

- ``tiny``: a 1 x 1 sigmoid output ``probability`` (a 1 x 1 response);
- ``softmax_201``: a 1024 x 201 softmax output ``probabilities`` (about 2.5 MB).

``POST /v1/models/NAME:predict`` answers the canned body whatever the request;
``GET /v1/models/NAME/metadata`` the signature (the guard reads the output name of a
single-output response from it); ``GET /v1/models/NAME`` the model's status (the
harness polls it to know a hop forwards).

    python -m bench.rest_upstream --listen 127.0.0.1:0 --port-file F
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from aiohttp import web

from bench._common import serve_until_signal, write_port_file
from guard.dev.backend.json_tensor import predict_response

DT_FLOAT = 1


@dataclass(frozen=True)
class RestModel:
    """One canned model: its name, output alias and response size."""

    name: str
    output: str
    rows: int
    classes: int

    @property
    def size(self) -> str:
        """``ROWSxCLASSES``, the size's name in the report."""
        return f"{self.rows}x{self.classes}"


TINY = RestModel("tiny", "probability", 1, 1)
SOFTMAX = RestModel("softmax_201", "probabilities", 1024, 201)
MODELS = (TINY, SOFTMAX)


def values(model: RestModel) -> np.ndarray:
    """The model's output: a sigmoid value, or softmax rows that sum to 1."""
    rng = np.random.default_rng(0)
    if model.classes == 1:
        return np.full((model.rows, 1), 0.7310586, np.float32)
    logits = rng.normal(0, 2, (model.rows, model.classes))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def predict_body(model: RestModel) -> bytes:
    """TF Serving's row-format answer for ``model``."""
    return predict_response([(model.output, values(model), DT_FLOAT)], "row")


def request_body(model: RestModel) -> bytes:
    """A row-format request (the canned upstream ignores it; the proxies forward it)."""
    return json.dumps({"instances": [[0.5] * 8] * model.rows}).encode()


def metadata_body(model: RestModel) -> bytes:
    """TF Serving's GetModelMetadata JSON for the model's serving_default signature."""
    dims = [{"size": "-1", "name": ""}, {"size": str(model.classes), "name": ""}]
    output = {"dtype": "DT_FLOAT", "tensor_shape": {"dim": dims, "unknown_rank": False}}
    signature = {
        "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}]}}},
        "outputs": {model.output: {**output, "name": f"{model.output}:0"}},
        "method_name": "tensorflow/serving/predict",
    }
    doc = {
        "model_spec": {"name": model.name, "signature_name": "", "version": "1"},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    }
    return json.dumps(doc, indent=1).encode()


def status_body(model: RestModel) -> bytes:
    """TF Serving's GetModelStatus JSON: version 1 AVAILABLE."""
    state = {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK"}}
    return json.dumps({"model_version_status": [state]}, indent=1).encode()


def app() -> web.Application:
    """The aiohttp application with every canned answer."""
    application = web.Application(client_max_size=1 << 30)
    for model in MODELS:
        base = f"/v1/models/{model.name}"
        application.router.add_post(f"{base}:predict", _canned(predict_body(model)))
        application.router.add_get(f"{base}/metadata", _canned(metadata_body(model)))
        application.router.add_get(base, _canned(status_body(model)))
    return application


def _canned(body: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    return answer


async def _serve(listen: str, port_file: str) -> None:
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    write_port_file(port_file, {"http": runner.addresses[0][1]})
    await serve_until_signal(runner.cleanup)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen, args.port_file))


if __name__ == "__main__":
    main()
