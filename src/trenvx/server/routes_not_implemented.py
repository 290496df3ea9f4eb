"""E2B endpoints trenvx knows but does not serve yet: a 501 that says which, and why.

Without these routes a call of E2B's SDK (``Sandbox.get_logs``, say) reaches no route, gets the
router's 404 and the SDK reports "sandbox not found", which sends the user looking for a missing
sandbox. A 501 names the endpoint, says it is not implemented in trenvx and where it
is planned; the issue that implements an endpoint removes its entry from :data:`NOT_IMPLEMENTED`.

Only paths the API does not serve in any method are listed: a method the API does not serve on
a path it does serve (``PATCH /templates/{id}``) stays the router's 405. The routes are not in
the OpenAPI document, which describes what is served.

Auth comes first, as on every route: without the API key the answer is 401, so the table does
not tell an anonymous caller anything the API's own documentation would not.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends

from .auth import require_api_key
from .errors import ApiError


@dataclass(frozen=True)
class PlannedEndpoint:
    """An endpoint of E2B's API that trenvx answers with 501 until it is built."""

    method: str
    path: str
    what: str
    plan: str


_NO_PLAN = "no issue plans it yet"

NOT_IMPLEMENTED: tuple[PlannedEndpoint, ...] = (
    PlannedEndpoint("GET", "/sandboxes/{sandboxID}/logs", "sandbox logs", _NO_PLAN),
    PlannedEndpoint("GET", "/v2/sandboxes/{sandboxID}/logs", "sandbox logs", _NO_PLAN),
    PlannedEndpoint("GET", "/secrets", "secrets", _NO_PLAN),
    PlannedEndpoint("POST", "/secrets", "secrets", _NO_PLAN),
    PlannedEndpoint("GET", "/secrets/{secretID}", "secrets", _NO_PLAN),
    PlannedEndpoint("POST", "/secrets/{secretID}", "secrets", _NO_PLAN),
    PlannedEndpoint("DELETE", "/secrets/{secretID}", "secrets", _NO_PLAN),
    PlannedEndpoint("GET", "/volumes", "volumes", _NO_PLAN),
    PlannedEndpoint("POST", "/volumes", "volumes", _NO_PLAN),
    PlannedEndpoint("GET", "/volumes/{volumeID}", "volumes", _NO_PLAN),
    PlannedEndpoint("DELETE", "/volumes/{volumeID}", "volumes", _NO_PLAN),
    PlannedEndpoint("POST", "/templates/tags", "template tags (only 'latest' exists)", _NO_PLAN),
    PlannedEndpoint("DELETE", "/templates/tags", "template tags (only 'latest' exists)", _NO_PLAN),
    PlannedEndpoint("GET", "/templates/{templateID}/tags", "template tags (only 'latest' exists)", _NO_PLAN),
)

router = APIRouter(dependencies=[Depends(require_api_key)])


def _refuse(endpoint: PlannedEndpoint):  # noqa: ANN202 - a FastAPI endpoint function
    message = (f"{endpoint.method} {endpoint.path} ({endpoint.what}) is not implemented in trenvx yet: "
               f"{endpoint.plan}")

    async def not_implemented() -> None:
        raise ApiError(501, message)

    not_implemented.__name__ = f"not_implemented_{endpoint.method.lower()}_{endpoint.path}"
    return not_implemented


for _endpoint in NOT_IMPLEMENTED:
    router.add_api_route(_endpoint.path, _refuse(_endpoint), methods=[_endpoint.method], status_code=501,
                         summary=f"Not implemented: {_endpoint.what}",
                         include_in_schema=False)  # not part of the API served (and no fuzzer target)
