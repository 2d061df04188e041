"""The ``template`` format: a webhook body written in the config, for the tools FinPulse has no format of its own
for (Google Chat, Discord, Mattermost, Splunk's HTTP Event Collector, a ticketing tool's inbound webhook, n8n...)::

    [[alerts.endpoints]]
    name = "chat"
    format = "template"
    url_env = "GOOGLE_CHAT_WEBHOOK_URL"
    template = { text = "{headline}\\n{messages_text}\\n{dashboard_link}" }
    group_template = { text = "{title}: {counts_text}\\n{lines}" }     # needed with group_by

A template is any JSON value: a TOML table (arrays, numbers and booleans in it stay as they are), or JSON text in a
string (a multi-line literal string takes a template pasted from a tool's documentation). In its strings, ``{name}``
is replaced by a field of the alert event (``alerts.formats.TEMPLATE_FIELDS``; for ``group_template``, a field of the
group notification, ``GROUP_TEMPLATE_FIELDS``)
and ``{{`` / ``}}`` are literal braces; keys are never filled. A string that is exactly one placeholder takes the
field's own JSON type (a number, a list, an object, null); inside longer text a field is written as text: null as
"", a list one item per line, an object as JSON. Names that are not fields are refused when the config is loaded.

The body is built as data and serialised once, so no text from a message can leave the string it is put in (no
JSON injection). What a tool does with markup inside a string is the tool's: Discord pings on "@everyone" in
``content`` unless the template says ``allowed_mentions = { parse = [] }``. Secrets never go in a template (it is
configuration, printed by ``finpulse config``): a tool's token goes in ``headers_env`` or in the URL (``url_env``).
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from stream.config import ConfigError

# {name}, or the escapes {{ and }}; anything else with a brace is a mistake the check names.
_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


def check_template(template: Any, fields: Mapping[str, str], where: str) -> Any:
    """The template as data (JSON text parsed), after checking every placeholder names a field; raise ConfigError
    saying what is wrong."""
    if isinstance(template, str):
        try:
            template = json.loads(template)
        except ValueError as exc:
            raise ConfigError(f"{where}: a template given as a string is JSON text, and this is not: {exc}") from None
    for text in _strings(template):
        for token in _TOKEN.finditer(text):
            name = token.group(1)
            if token.group(0) in ("{{", "}}"):
                continue
            if name is None:
                raise ConfigError(f"{where}: a lone {token.group(0)!r} in {text!r}: write {{{{ or }}}} for a literal "
                                  f"brace, {{name}} for a field")
            if name not in fields:
                raise ConfigError(f"{where}: {{{name}}} is not a field (fields: {', '.join(fields)})")
    return template


def fill(template: Any, fields: Mapping[str, Any]) -> Any:
    """``template`` with every placeholder replaced by its field (checked by ``check_template`` beforehand)."""
    if isinstance(template, str):
        whole = _TOKEN.fullmatch(template)
        if whole and whole.group(1):
            return fields[whole.group(1)]
        return _TOKEN.sub(lambda m: _as_text(fields[m.group(1)]) if m.group(1) else m.group(0)[0], template)
    if isinstance(template, Mapping):
        return {key: fill(value, fields) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(item, fields) for item in template]
    return template


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "\n".join(_as_text(item) for item in value)
    if isinstance(value, Mapping):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
