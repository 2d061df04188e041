"""The ``template`` format: a webhook body written in the config, for the tools FinPulse has no format of its own
for (Google Chat, Discord, Mattermost, Splunk's HTTP Event Collector, a ticketing tool's inbound webhook, n8n...)::

    [[alerts.endpoints]]
    name = "chat"
    format = "template"
    url_env = "GOOGLE_CHAT_WEBHOOK_URL"
    template = { text = "{headline}\\n{messages_text|max:2000}\\n{dashboard_link}" }
    group_template = { text = "{title}: {counts_text}\\n{lines}" }     # needed with group_by

A template is a JSON object or array: a TOML table (arrays, numbers and booleans in it stay as they are), or JSON
text in a string (a multi-line literal string takes a template pasted from a tool's documentation). In its string
values, ``{name}`` is replaced by a field of the alert event (``alerts.formats.TEMPLATE_FIELDS``; for
``group_template``, a field of the group notification, ``GROUP_TEMPLATE_FIELDS``), and ``{{`` / ``}}`` are literal
braces. Keys are the template's own: never filled, and a brace in one is refused.

A string that is exactly one placeholder takes the field's own JSON type (a number, a list, an object, null); inside
longer text a field is written as text: null as "", a list one item per line, an object as JSON. Filters after the
name (``FILTERS``) make text too: ``{observed_count|text}`` is "41" where a tool wants strings only,
``{messages_text|max:1000}`` is cut to 1,000 characters (a tool's limit: Discord's embed fields take 1,024),
``{summary|default:none}`` stands in for an empty field (a resolve has no messages), and
``{severity|map:critical=P1,warning=P3,*=P5}`` turns a value into a tool's own word. Names that are not fields,
filters that do not exist, and values JSON cannot carry (TOML dates, NaN) are refused when the config is loaded.

The body is built as data and serialised once, so no text from a message can leave the string it is put in (no
JSON injection). What a tool does with markup inside a string is the tool's: message text is sent as it was
written, so Discord pings on "@everyone" in ``content`` unless the template says
``allowed_mentions = { parse = [] }``, and Mattermost reads "@channel". Secrets never go in a template (it is
configuration, shown by ``finpulse dispatch --preview``), and a literal value under a key named like one
(``SECRET_NAME``: token, password, api_key...) is refused: a tool's token goes in ``headers_env`` or in the URL
(``url_env``).

A tool that ends an incident at another address (Opsgenie's ``/v2/alerts/{alias}/close``) takes the resolve there:
``resolve_url`` is a URL template (``check_url_template``, ``fill_url``) whose path and query take the same fields,
each percent-encoded, and ``resolve_template`` the resolve's body. Its scheme, host and port are fixed text: an
alert's data never chooses where a request goes. A tool that names the incident it opened in its answer (a
ServiceNow ``sys_id``, a Jira issue key) is closed by that name: ``incident_id_from`` is a JSON pointer into the
answer to the firing (``check_json_pointer``, ``at_json_pointer``), and ``{incident_id}`` the value found there,
with ``resolve_method`` (POST, PUT or PATCH) for a tool that updates a record in place. An escalation of that
incident is sent to it as an update (``update_template``, ``update_url``, ``update_method``) or not at all.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

import yarl

from stream.config import ConfigError

# {name} or {name|filter|filter:arg}, or the escapes {{ and }}; any other brace is a mistake the check names.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FILTERS = {
    "text": "the field as text, even alone in its string",
    "max:N": "cut to at most N characters, the last one an ellipsis",
    "default:TEXT": "TEXT where the field is empty or null",
    "map:A=X,B=Y": "X where the field is A, Y where it is B (*=Z: Z for any other value; else kept)",
}
_SHOWN_MAX = 80  # how much of a wrong string an error quotes
# Keys (and URL query parameters) whose literal values would be secrets. Not "key" alone: a Jira body's project
# {"key": "RISK"} is none.
SECRET_NAME = re.compile(r"secret|passw|token|authori[sz]ation|credential|(api|access|private|routing|integration)"
                         r"[_-]?key", re.IGNORECASE)


def check_template(template: Any, fields: Mapping[str, str], where: str,
                   values: Mapping[str, tuple[str, ...]] = {}) -> Any:
    """The template as data (JSON text parsed), after checking that it is a JSON object or array that JSON can carry,
    that no key holds a brace, and that every placeholder names a field and known filters (a ``|map:`` of a field in
    ``values``, the fields with a fixed set of values, only names values it has); raise ConfigError saying what is
    wrong."""
    if isinstance(template, str):
        template = _parse_json_text(template, where)
    if not isinstance(template, (Mapping, list)) or not template:
        raise ConfigError(f"{where}: the body must be a non-empty JSON object or array (a TOML table such as "
                          f"{{ text = \"{{headline}}\" }}, or JSON text)")
    try:
        json.dumps(template, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:   # TOML dates and times, NaN and infinities, lone surrogates
        raise ConfigError(f"{where}: a value JSON cannot carry ({_shown(str(exc))}); write dates as strings, and "
                          f"numbers as finite numbers") from None
    for key, value in _pairs(template):
        if "{" in key or "}" in key:
            raise ConfigError(f"{where}: the key {_shown(key)!r} holds a brace: keys are the template's own and never "
                              f"filled; only values take {{fields}}")
        if SECRET_NAME.search(key) and isinstance(value, str) and value and not _TOKEN.search(value):
            raise ConfigError(f"{where}: {key} looks like it carries a secret, and secrets never go in the config "
                              f"(the preview prints templates): send it as a header from the environment, "
                              f"headers_env = {{ \"Authorization\" = \"VAR\" }}, or in a URL from url_env "
                              f"(resolve_url_env) (value not shown)")
    for text in _strings(template):
        for token in _TOKEN.finditer(text):
            if token.group(0) in ("{{", "}}"):
                continue
            if token.group(1) is None:
                raise ConfigError(f"{where}: a lone {token.group(0)!r} in {_shown(text)!r}: write {{{{ or }}}} for a "
                                  f"literal brace, {{name}} for a field")
            _check_placeholder(token.group(1), fields, where, values)
    return template


def fill(template: Any, fields: Mapping[str, Any]) -> Any:
    """``template`` with every placeholder replaced by its field (checked by ``check_template`` beforehand)."""
    if isinstance(template, str):
        whole = _TOKEN.fullmatch(template)
        if whole and whole.group(1) and "|" not in whole.group(1):
            return fields[whole.group(1)]
        return _TOKEN.sub(lambda m: _filled(m.group(1), fields) if m.group(1) is not None else m.group(0)[0],
                          template)
    if isinstance(template, Mapping):
        return {key: fill(value, fields) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(item, fields) for item in template]
    return template


def check_url_template(url: str, fields: Mapping[str, str], where: str,
                       values: Mapping[str, tuple[str, ...]] = {}) -> str:
    """``url`` after checking that its placeholders name fields and filters and all come after its scheme, host and
    port (the origin), and that its own text is already percent-encoded (the filled URL is sent as it is, so that
    no value can become a dot segment a client would resolve); raise ConfigError saying what is wrong. Whether the
    origin is a URL FinPulse may send to is the caller's check (``alerts.endpoints.check_url``)."""
    tokens = list(_TOKEN.finditer(url))
    origin = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#{}]*", url)
    if tokens and (origin is None or url[origin.end():origin.end() + 1] not in ("/", "?")):
        raise ConfigError(f"{where}: {{fields}} may fill only a URL's path and query; its scheme, host and port are "
                          f"written out (e.g. https://api.example.com/alerts/{{alert_id}}/close)")
    for token in tokens:
        if token.group(1) is None:
            raise ConfigError(f"{where}: {token.group(0)!r} in the URL: a URL takes {{name}} for a field, and %7B / "
                              f"%7D for a brace")
        _check_placeholder(token.group(1), fields, where, values)
    if "#" in url:
        raise ConfigError(f"{where}: a URL's fragment (#...) is never sent; leave it out")
    probe = _TOKEN.sub("x", url)
    written, parsed = urlsplit(probe), yarl.URL(probe)
    if (written.path or "/") != (parsed.raw_path or "/") or written.query != parsed.raw_query_string:
        raise ConfigError(f"{where}: write the URL's path and query percent-encoded as they are to be sent (a space "
                          f"as %20), without . or .. segments")
    return url


def fill_url(url: str, fields: Mapping[str, Any]) -> str:
    """``url`` (checked by ``check_url_template``) with each placeholder replaced by its field as text,
    percent-encoded so that a value cannot add a path segment, a query parameter or a fragment, and a path segment
    it makes "." or ".." written %2E (send the result as an encoded URL: a client would resolve those)."""
    filled = _TOKEN.sub(lambda m: quote(_filled(m.group(1), fields), safe=""), url)
    parts = urlsplit(filled)
    path = "/".join(segment.replace(".", "%2E") if segment in (".", "..") else segment
                    for segment in parts.path.split("/"))
    return urlunsplit(parts._replace(path=path))


def fields_used(template: Any) -> set[str]:
    """The names of the fields a (checked) template or URL template fills."""
    return {token.group(1).split("|")[0] for text in _strings(template) for token in _TOKEN.finditer(text)
            if token.group(1)}


def check_json_pointer(pointer: str, where: str) -> str:
    """``pointer`` after checking that it is a JSON pointer (RFC 6901: "/result/sys_id", "/key", "/0/id")."""
    if not pointer.startswith("/") or pointer.endswith("/") or re.search(r"~[^01]|~$", pointer):
        raise ConfigError(f"{where}: {_shown(pointer)!r} is not a JSON pointer into the answer: write it as "
                          f"\"/result/sys_id\" (ServiceNow) or \"/key\" (Jira), each step after a /")
    return pointer


def at_json_pointer(document: Any, pointer: str) -> Any:
    """The value at ``pointer`` (checked by ``check_json_pointer``) in ``document``; None where there is none."""
    for step in pointer[1:].split("/"):
        step = step.replace("~1", "/").replace("~0", "~")
        if isinstance(document, Mapping):
            document = document.get(step)
        elif isinstance(document, list) and step.isdigit() and int(step) < len(document):
            document = document[int(step)]
        else:
            return None
    return document


def _check_placeholder(inner: str, fields: Mapping[str, str], where: str,
                       values: Mapping[str, tuple[str, ...]] = {}) -> None:
    name, *filters = inner.split("|")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: {{{_shown(inner)}}} does not name a field: a field is a name of letters, digits "
                          f"and _ (fields: {', '.join(fields)}), optionally followed by filters: "
                          f"{', '.join('|' + f for f in FILTERS)}")
    if name not in fields:
        raise ConfigError(f"{where}: {{{name}}} is not a field (fields: {', '.join(fields)})")
    for n, spec in enumerate(filters):
        kind, has_arg, arg = spec.partition(":")
        if kind == "text" and not has_arg:
            continue
        if kind == "max" and arg.isdigit() and int(arg) >= 1:
            continue
        if kind == "default" and has_arg:
            continue
        if kind == "map" and has_arg:
            try:
                table = _mapping(arg)
            except ValueError as exc:
                raise ConfigError(f"{where}: {{{_shown(inner)}}}: {exc}") from None
            # A field with a fixed set of values, mapped as it is: a name outside it is a typo that would never match.
            never = [a for a in table if a != "*" and n == 0 and name in values and a not in values[name]]
            if never:
                raise ConfigError(f"{where}: {{{_shown(inner)}}}: {name} is never {', '.join(map(repr, never))} "
                                  f"(its values: {', '.join(repr(v) for v in values[name])})")
            continue
        raise ConfigError(f"{where}: {{{_shown(inner)}}}: {spec!r} is not a filter (filters: "
                          f"{', '.join('|' + f for f in FILTERS)})")


def _filled(inner: str, fields: Mapping[str, Any]) -> str:
    name, *filters = inner.split("|")
    text = _as_text(fields[name])
    for spec in filters:
        kind, _, arg = spec.partition(":")
        if kind == "default" and not text:
            text = arg
        elif kind == "max":
            text = cut(text, int(arg))
        elif kind == "map":
            table = _mapping(arg)
            text = table.get(text, table.get("*", text))
    return text


def _mapping(arg: str) -> dict[str, str]:
    """``A=X, B=Y`` as {A: X, B: Y} (spaces around names and values dropped); raise ValueError saying why not."""
    table: dict[str, str] = {}
    for pair in arg.split(","):
        value_of, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or not value_of or "=" in value:
            raise ValueError(f"map takes name=value pairs separated by commas (critical=P1,warning=P3,*=P5), not "
                             f"{pair.strip()!r}; a name or value cannot hold , = | {{ }}")
        if value_of in table:
            raise ValueError(f"map gives {value_of!r} twice")
        table[value_of] = value
    return table


def _parse_json_text(text: str, where: str) -> Any:
    def no_twice(pairs):
        keys = [key for key, _ in pairs]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            raise ConfigError(f"{where}: the JSON text gives the key(s) {twice} twice")
        return dict(pairs)
    try:
        return json.loads(text, object_pairs_hook=no_twice)
    except ConfigError:
        raise
    except ValueError as exc:
        looks_like_json = re.match(r'\s*(\[|\{\s*["}])', text)
        hint = ("" if looks_like_json else
                "; for a body such as {\"text\": ...} write a TOML table: template = { text = \"{headline}\" }")
        raise ConfigError(f"{where}: a template given as a string is JSON text, and this is not ({exc}){hint}") from None


def cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, the last an ellipsis when it was longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(text: str) -> str:
    return cut(text, _SHOWN_MAX)


def _pairs(value: Any):
    """Every (key, value) of every object in ``value``, nested ones included."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key), item
            yield from _pairs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _pairs(item)


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
