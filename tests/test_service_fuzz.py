"""Fuzz the service's API from its own OpenAPI schema (schemathesis): no input gets a 5xx.

Bounded: a fixed number of generated requests per operation, valid ones and invalid ones,
sent in-process (ASGI), with a time limit on the test. Every error must be a JSON sentence.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (or run `make install`)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from cbir.index import Searcher  # noqa: E402
from cbir.service import samples  # noqa: E402
from cbir.service.app import create_app  # noqa: E402

EXAMPLES = 60  # per operation and mode


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    _, shared = samples.build_index(tmp_path_factory.getbasetemp() / "cbir-service-samples")
    index = tmp_path_factory.mktemp("service-fuzz") / "index"
    shutil.copytree(shared, index)  # the fuzzer may add and delete images
    app = create_app(searcher=Searcher(index), max_upload_mb=2)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check(case) -> None:
    response = case.call_and_validate(checks=[not_a_server_error])
    assert response.status_code < 500, (case.method, case.path, response.text)
    if response.status_code >= 400:
        ctype = response.headers.get("content-type") or response.headers.get("Content-Type")
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        assert ctype.startswith("application/json"), response.headers
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail, response.text


@pytest.mark.timeout(300)
def test_fuzz_no_server_errors(api_schema):
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) == 9
    failures, calls = [], 0
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case):
                nonlocal calls
                calls += 1
                check(case)

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (an operation without parameters)
                assert mode == GenerationMode.NEGATIVE
            except Exception as e:  # report every operation, not only the first that fails
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
    assert calls >= len(operations) * 2 * 5
