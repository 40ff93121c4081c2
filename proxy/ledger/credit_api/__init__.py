"""The credit API and the store page (`llm-proxy credit-api`, mounted by `demo` too).

One job per module: `auth` (who is asking: user keys, service keys), `held` (credit
held by requests in flight), `usage` (the consumption board), `orders` (packages
bought, paid once), `rewards` (reward rules), `services` (what the handlers share),
`account_routes` (the caller's own data), `grant_routes` (orders, payments, rewards),
`routes` (the route table), `store_page` (the static page), `app` (wiring and
lifecycle), `demo` (the demo's key).
"""
