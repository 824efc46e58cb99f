"""Schemathesis against the API's own OpenAPI schema: no response is a 5xx, every one matches the schema.

Driven through schemathesis' Python API (one hypothesis run per operation, bounded examples) on a
fresh PostgreSQL database, with an API key, so the authenticated routes are exercised too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from api_support import api_settings, bearer, make_key, pg_database
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api.app import create_app

# Paths whose responses never end (server-sent events) cannot be fuzzed by a request/response check.
SKIP = {"/v1/jobs/{job_id}/events"}


def test_every_operation_conforms_to_the_schema(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = pg_database(request)
    app = create_app(api_settings(tmp_path, url))  # the file broker: /readyz is 200, submits dispatch
    headers = bearer(make_key(url))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIP:
            continue
        checked += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            # A spec that fits the JSON schema can still be refused (an unknown architecture, decay
            # epochs past the last epoch): that is validation, not a fault, so that check is left out.
            case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

        try:
            run()
        except Unsatisfiable:
            continue
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert checked >= 10
    assert not failures, "\n\n".join(failures)
