"""alerts: decide and deliver. Detect negative spikes in closed windows against each key's own baseline (an episode
fires, escalates as it worsens, resolves), and deliver each alert event to risk teams' endpoints (signed webhooks,
Slack, Teams, PagerDuty, Alertmanager, or a body the config writes for any other tool) exactly once per endpoint, in
order, retrying until acknowledged, one by one or, on an endpoint that asks for it, grouped into one notification per
group (storms); withheld while a silence a risk team set covers them (``finpulse silence``) or another firing alert
says it already (inhibition rules), and sent when that ends if still open; each endpoint isolated from the others'
trouble (its own concurrency, a circuit breaker) and reached its own way (internal CA, mTLS, extra headers, an HTTP
proxy).
"""
