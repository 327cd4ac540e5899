"""Command templates: the keys a node may override, and ``{name}`` placeholders filled with
shell-quoted values.

A placeholder is ``{name}`` with ``name`` in lower case (letters and ``_``). ``${Package}``
(shell and dpkg-query syntax) and ``{ print $1 }`` (awk) are left alone; write ``{{name}}``
for a literal ``{name}``. Values are quoted with ``shlex.quote``; a sequence becomes several
quoted words. Only prefixes named in ``verbatim`` (trusted configuration such as the ``dpkg``
command) are inserted unquoted. User text is never inserted unquoted.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from core.errors import ConfigError

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}|(?<!\$)\{([a-z_]+)\}")

Value = str | Sequence[str]


def placeholders(template: str) -> set[str]:
    """The placeholder names a template uses."""
    return {m.group(2) for m in _PLACEHOLDER.finditer(template) if m.group(2)}


def unknown_placeholders(template: str, accepted: Collection[str]) -> list[str]:
    return sorted(placeholders(template) - set(accepted))


def quoted_placeholders(template: str) -> list[str]:
    """Placeholders written inside shell quotes (``"{message}"``, ``'{id}'``): their values
    are quoted already, and quotes around them undo that quoting."""
    inside: list[str | None] = []
    quote: str | None = None
    escaped = False
    for char in template:
        inside.append(quote)
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote is None and char in "'\"":
            quote = char
        elif char == quote:
            quote = None
    return sorted(
        {
            m.group(2)
            for m in _PLACEHOLDER.finditer(template)
            if m.group(2) and m.group(2) not in VERBATIM and inside[m.start()] is not None
        }
    )


def fill(template: str, values: Mapping[str, Value], *, verbatim: Collection[str] = ()) -> str:
    """The command line of ``template`` with every placeholder replaced.

    Raises ``KeyError`` for a placeholder without a value (templates are checked against
    their accepted placeholders when a driver is built, so this is a programming error).
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "{" + match.group(1) + "}"
        name = match.group(2)
        value = values[name]
        if name in verbatim:
            return value if isinstance(value, str) else " ".join(value)
        if isinstance(value, str):
            return shlex.quote(value)
        return " ".join(shlex.quote(item) for item in value)

    return _PLACEHOLDER.sub(replace, template)


VERBATIM = frozenset({"dpkg", "dpkg_query"})

CHECKSUM_DEFAULT = "openssl dgst -sha256 -r {file} 2>/dev/null || sha256sum {file}"
"""OpenSSL's SHA-256 uses the CPU's SHA instructions (about 8 x coreutils' ``sha256sum``
on x86 with SHA-NI); ``sha256sum`` when openssl is not installed or fails."""


_COMMON = frozenset({"node"}) | VERBATIM


@dataclass(frozen=True, slots=True, kw_only=True)
class TemplateSpec:
    default: str
    placeholders: frozenset[str] = frozenset()
    required: bool = False


TEMPLATES: Mapping[str, TemplateSpec] = {
    "dpkg": TemplateSpec(default="dpkg", required=True),
    "dpkg_query": TemplateSpec(default="dpkg-query", required=True),
    "installed": TemplateSpec(
        default="{dpkg_query} -W -f '${Package}\\t${Version}\\t${db:Status-Abbrev}\\n'",
        required=True,
    ),
    "sessions": TemplateSpec(default="loginctl list-sessions --no-legend"),
    "announce": TemplateSpec(default="wall {message}", placeholders=frozenset({"message"})),
    "logon_disabled": TemplateSpec(default="test -e /etc/nologin"),
    "logon_disable": TemplateSpec(
        default="echo 'Logon is disabled for maintenance.' > /etc/nologin"
    ),
    "logon_enable": TemplateSpec(default="rm -f /etc/nologin"),
    "disconnect": TemplateSpec(
        default="loginctl terminate-session {id}", placeholders=frozenset({"id", "user"})
    ),
    "checksum": TemplateSpec(
        default=CHECKSUM_DEFAULT, placeholders=frozenset({"file"}), required=True
    ),
    "install": TemplateSpec(
        default=(
            "DEBIAN_FRONTEND=noninteractive {dpkg} --force-confdef --force-confold -i {files}"
        ),
        placeholders=frozenset({"files"}),
        required=True,
    ),
    "reboot_required": TemplateSpec(default="test -e /var/run/reboot-required"),
    "mark_reboot_required": TemplateSpec(default="touch /var/run/reboot-required"),
    "restart_services": TemplateSpec(default="true"),
    "boot_id": TemplateSpec(default="cat /proc/sys/kernel/random/boot_id"),
    "reboot": TemplateSpec(default="systemctl reboot"),
    "post_check": TemplateSpec(default="true"),
    "integrity": TemplateSpec(default="{dpkg} --verify"),
    "owners": TemplateSpec(default="{dpkg_query} -S {paths}", placeholders=frozenset({"paths"})),
}
"""Every command template key, with its default and the placeholders it may use."""


def resolve_templates(node: str, overrides: Mapping[str, str]) -> dict[str, str]:
    """The node's templates (defaults with its overrides); ``ConfigError`` lists every problem."""
    problems: list[str] = []
    accepted = ", ".join(TEMPLATES)
    for key in overrides:
        if key not in TEMPLATES:
            problems.append(
                f"nodes.{node}.commands.{key}: unknown command key; accepted keys: {accepted}"
            )
    templates = {key: overrides.get(key, spec.default) for key, spec in TEMPLATES.items()}
    for key, spec in TEMPLATES.items():
        template = templates[key]
        if spec.required and not template.strip():
            problems.append(f"nodes.{node}.commands.{key}: must not be empty")
        allowed = spec.placeholders | (frozenset({"node"}) if key in VERBATIM else _COMMON)
        bad = unknown_placeholders(template, allowed)
        if bad:
            problems.append(
                f"nodes.{node}.commands.{key}: unknown placeholder "
                + ", ".join("{" + b + "}" for b in bad)
                + "; accepted here: "
                + ", ".join("{" + a + "}" for a in sorted(allowed))
                + " (write {{name}} for a literal {name})"
            )
        quoted = quoted_placeholders(template)
        if quoted:
            problems.append(
                f"nodes.{node}.commands.{key}: placeholder "
                + ", ".join("{" + q + "}" for q in quoted)
                + " is inside quotes; tgops quotes every value itself, and quotes around a "
                "placeholder defeat that: write it without quotes"
            )
    if problems:
        raise ConfigError(problems)
    return templates
