"""GET/DELETE /v1/responses/{id} and GET /v1/responses/{id}/input_items: passed
through to the provider that stores the response; nothing is charged.

A response id does not say which provider holds it, and these calls have no body,
so the alias is named by the `model` query parameter (`?model=<alias>`, removed
before the call goes upstream) or the `X-Model-Alias` header. Without either, the
provider is found when exactly one provider serves the Responses API through the
configured aliases; otherwise it is a 400 asking for the alias. The alias must
serve `responses` and its provider speak it (`responses: true`), like a POST.
"""

from __future__ import annotations

import re

from aiohttp import web

from proxy.config.model import Provider, YamlConfig
from proxy.errors import (
    credentials_missing,
    invalid_request,
    model_not_found,
    response_alias_required,
)
from proxy.server.chat_request import check_serves
from proxy.server.state import STATE
from proxy.upstream.passthrough import pass_through

ALIAS_HEADER = "X-Model-Alias"
_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")


def provider_for(config: YamlConfig, query_model: str | None, header: str | None) -> Provider:
    name = query_model or header
    if name:
        alias = config.aliases.get(name)
        if alias is None:
            raise model_not_found(name)
        check_serves(alias, "responses")
        return alias.provider
    providers = {
        a.provider.name: a.provider for a in config.aliases.values() if a.serves("responses")
    }
    if len(providers) != 1:
        raise response_alias_required()
    return next(iter(providers.values()))


async def stored_response(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ctx = await state.auth.authenticate(request.headers)  # callers only
    query = dict(request.query)
    provider = provider_for(
        state.config, query.pop("model", None), request.headers.get(ALIAS_HEADER)
    )
    if provider.key_missing:
        raise credentials_missing(provider.name, provider.api_key_env or "")
    rid = request.match_info["response_id"]
    if not _ID.fullmatch(rid):  # it becomes part of an upstream URL: no `..`, no `%2F`
        raise invalid_request("not a response id", param="response_id", code="invalid_value")
    path = f"/responses/{rid}" + ("/input_items" if request.path.endswith("/input_items") else "")
    return await pass_through(state.upstream, provider, request.method, path, query, ctx.request_id)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/responses/{response_id}", stored_response)
    app.router.add_delete("/v1/responses/{response_id}", stored_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", stored_response)
