"""The README's REST section tells the truth: each "after" example is what the guard answers.

Each case sends the README's "before" body (TF Serving's answer, as the local backend or
a several-output model wrote it) through a fake TF Serving REST upstream (a real aiohttp
server) and a real guard with the README's rules, over real HTTP. The guard's answer must
appear in the README's REST section as a code block holding the same JSON, keys in the
same order; unfolded examples must match byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from guard.control.config import parse_config
from tests.support.guard import RunningGuard, start_in_process
from tests.support.rest_upstream import FakeRestUpstream

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
REST_SECTION = README[README.index("## REST") : README.index("## Config reference")]

ONE_ROW = '{\n    "predictions": [[0.542952418], [0.0884606615]\n    ]\n}'
ONE_COLUMNAR = (
    '{\n    "outputs": [\n        [\n            0.542952418\n        ],\n'
    "        [\n            0.0884606615\n        ]\n    ]\n}"
)
CLAMPED = '{\n    "predictions": [[1.00285], [0.000463]\n    ]\n}'
SEVERAL_ROW = """{
    "predictions": [
        {
            "probs": [0.7, 0.2, 0.1],
            "score": 0.93
        },
        {
            "probs": [0.1, 0.3, 0.6],
            "score": 0.12
        }
    ]
}"""
SEVERAL_COLUMNAR = """{
    "outputs": {
        "probs": [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]],
        "score": [0.93, 0.12]
    }
}"""
SEVERAL_RULES = [
    {"name": "probs", "argmax": True, "labels": ["cat", "dog", "fox"]},
    {"name": "score", "threshold": 0.5, "labels": ["no", "yes"]},
]
SEVERAL_OUTPUTS = {"probs": ("DT_FLOAT", [-1, 3]), "score": ("DT_FLOAT", [-1])}


@dataclass(frozen=True)
class Case:
    model: str
    before: str
    action: str
    folded: bool  # the README shows the guard's additions on fewer lines


CASES = {
    "row, one output": Case("binary_mlp", ONE_ROW, "clean", False),
    "row, one output, clamped": Case("wide_deep", CLAMPED, "clamped", False),
    "columnar, one output": Case("binary_mlp", ONE_COLUMNAR, "clean", True),
    "row, several outputs": Case("several", SEVERAL_ROW, "clean", False),
    "columnar, several outputs": Case("several", SEVERAL_COLUMNAR, "clean", True),
}


def _example_models() -> list[dict[str, Any]]:
    """examples/guard.yaml's rules for the README's one-output models, plus 'several'."""
    shipped = yaml.safe_load((REPO / "examples" / "guard.yaml").read_text())["models"]
    chosen = [m for m in shipped if m["name"] in ("wide_deep", "binary_mlp")]
    return [*chosen, {"name": "several", "outputs": SEVERAL_RULES}]


def _code_blocks() -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```$", REST_SECTION, re.S | re.M)


def _ordered(text: str) -> str:
    """The JSON with its key order kept and its layout dropped."""
    return json.dumps(json.loads(text, object_pairs_hook=list))


@pytest.fixture
async def fake() -> AsyncIterator[FakeRestUpstream]:
    upstream = FakeRestUpstream()
    upstream.metadata("binary_mlp", {"probability": ("DT_FLOAT", [-1, 1])})
    upstream.metadata("wide_deep", {"output_1": ("DT_FLOAT", [-1, 1])})
    upstream.metadata("several", SEVERAL_OUTPUTS)
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def guard(fake: FakeRestUpstream) -> AsyncIterator[RunningGuard]:
    data = {
        "listen": "127.0.0.1:0",
        "upstream": "127.0.0.1:9",  # REST only here
        "rest_listen": "127.0.0.1:0",
        "rest_upstream": fake.address,
        "models": _example_models(),
    }
    running = await start_in_process(parse_config(data, "readme.yaml", REPO))
    yield running
    await running.stop()


@pytest.mark.parametrize("name", list(CASES))
async def test_readme_rest_example_is_the_guards_answer(
    name: str, fake: FakeRestUpstream, guard: RunningGuard
) -> None:
    case = CASES[name]
    fake.predict(case.model, case.before)
    url = f"{guard.rest_url}/v1/models/{case.model}:predict"
    async with aiohttp.ClientSession() as session, session.post(url, data=b"{}") as resp:
        assert resp.status == 200
        assert resp.headers["x-guard-action"] == case.action
        after = await resp.text()

    blocks = [b.strip() for b in _code_blocks()]
    assert after != case.before
    assert case.before.strip() in blocks or name.endswith("clamped"), "README lost the before"
    if case.folded:
        assert _ordered(after) in [_ordered(b) for b in blocks if b.startswith("{")], after
    else:
        assert after.strip() in blocks, after
