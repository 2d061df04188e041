"""alerts: decide and deliver. Detect negative spikes in closed windows against each key's own baseline, and
deliver each alert to risk teams' endpoints (signed webhooks, Slack, PagerDuty, Alertmanager) exactly once per
endpoint, retrying until acknowledged.
"""
