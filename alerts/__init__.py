"""alerts: decide and deliver. Detect negative spikes in closed windows against each key's own baseline (an episode
fires, escalates as it worsens, resolves), and deliver each alert event to risk teams' endpoints (signed webhooks,
Slack, PagerDuty, Alertmanager) exactly once per endpoint, in order, retrying until acknowledged; each endpoint
isolated from the others' trouble (its own concurrency, a circuit breaker) and reached its own way (internal CA,
mTLS, extra headers, an HTTP proxy).
"""
