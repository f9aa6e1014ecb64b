"""schemathesis against the node's own OpenAPI document: every documented
operation, generated inputs, no server error and no answer outside the
spec. What a generated create makes is destroyed right after."""

import os

import requests
import schemathesis
from hypothesis import HealthCheck, settings

# The node with an API key: schemathesis also checks that a wrong or
# missing key is refused.
BASE = os.environ["WRENN_TEST_KEYED_URL"]
KEY = os.environ["WRENN_TEST_KEYED_KEY"]
HEADERS = {"X-API-Key": KEY}

schema = schemathesis.from_uri(f"{BASE}/openapi.json", base_url=BASE)
# The event feed never ends: a test of its own reads it (test_activity.py).
schema = schema.exclude(path="/v1/events/stream")


@schema.auth()
class ApiKey:
    def get(self, case, context):
        return KEY

    def set(self, case, data, context):
        case.headers = case.headers or {}
        case.headers["X-API-Key"] = data


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("WRENN_SCHEMATHESIS_EXAMPLES", "6")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation(case):
    response = case.call(timeout=180)
    try:
        case.validate_response(response)
    finally:
        if case.method == "POST" and response.status_code == 201:
            body = response.json()
            if case.path in ("/v1/capsules", "/v1/sandboxes"):
                requests.delete(f"{BASE}{case.path}/{body['id']}", headers=HEADERS, timeout=120)
            elif case.path == "/v1/snapshots":
                requests.delete(f"{BASE}/v1/snapshots/{body['name']}", headers=HEADERS, timeout=120)
