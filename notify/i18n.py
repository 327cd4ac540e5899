"""The languages of what users and contacts read: the gettext catalogue and local formats.

English is the language the texts are written in (the ``msgid``); every other language
has a catalogue ``notify/locale/LANG/LC_MESSAGES/tgops.po``. ``scripts/setup`` compiles
the catalogues to ``.mo`` files (Babel's compiler, ``python -m notify.i18n compile``);
a catalogue whose ``.mo`` is missing or older than its ``.po`` (a checkout that was not
set up again after a change) is compiled in memory from the ``.po`` when first used, by
the same compiler, so a text is never shown in English for want of a build step.

``python -m notify.i18n extract`` collects every text from the templates
(``notify/templates``) and the Python modules that mark them (``_()``) into
``tgops.pot`` and merges it into each ``.po``; ``check`` says what is missing.

Dates and times follow the language: ``24.12.2026, 22:00 Uhr`` and ``24 Dec 2026, 22:00``.
Operator replies (Slack, CLI, admin alerts) are not translated.
"""

from __future__ import annotations

import functools
import gettext
import io
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_datetime, get_day_names
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

from core.localtime import local_text
from core.settings import LANGUAGES, Language

log = logging.getLogger(__name__)

DOMAIN = "tgops"
LOCALE_DIR = Path(__file__).parent / "locale"
SOURCE_LANGUAGE: Language = "en"

_DATETIME = {"en": "d MMM y, HH:mm", "de": "dd.MM.y, HH:mm 'Uhr'"}
_DATETIME_SECONDS = {"en": "d MMM y, HH:mm:ss", "de": "dd.MM.y, HH:mm:ss 'Uhr'"}
_DATE = {"en": "EEE d MMM y", "de": "EEE, dd.MM.y"}
_TIME = {"en": "HH:mm", "de": "HH:mm 'Uhr'"}
_ISO_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def po_path(language: str) -> Path:
    return LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"


def mo_path(language: str) -> Path:
    return po_path(language).with_suffix(".mo")


def compile_catalogue(language: str) -> bytes:
    """The ``.mo`` bytes of a language's ``.po`` (fuzzy entries left out)."""
    with po_path(language).open("rb") as handle:
        catalog = read_po(handle, locale=language, domain=DOMAIN)
    out = io.BytesIO()
    write_mo(out, catalog, use_fuzzy=False)
    return out.getvalue()


@functools.cache
def translations(language: str) -> gettext.NullTranslations:
    """The catalogue of ``language`` (English: the texts as written)."""
    if language == SOURCE_LANGUAGE:
        return gettext.NullTranslations()
    po, mo = po_path(language), mo_path(language)
    if mo.exists() and mo.stat().st_mtime >= po.stat().st_mtime:
        with mo.open("rb") as handle:
            return gettext.GNUTranslations(handle)
    log.info(
        "catalogue %s: %s is missing or older than its .po; compiled from the .po", language, mo
    )
    return gettext.GNUTranslations(io.BytesIO(compile_catalogue(language)))


def language_of(value: str | None, default: Language = SOURCE_LANGUAGE) -> Language:
    """``value`` when it is a supported language, else ``default``."""
    for known in LANGUAGES:
        if value == known:
            return known
    return default


def negotiate(accept_language: str | None, default: Language = SOURCE_LANGUAGE) -> Language:
    """The supported language the browser likes best (``Accept-Language``, RFC 9110 12.5.4)."""
    best: tuple[float, int] = (0.0, 0)
    chosen: Language | None = None
    for position, part in enumerate((accept_language or "").split(",")[:32]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary == "*":
            primary = default
        found = language_of(primary, default="")  # type: ignore[arg-type]
        if found and quality > 0 and (quality, -position) > best:
            best, chosen = (quality, -position), found
    return chosen or default


@dataclass(frozen=True, slots=True)
class Translator:
    """Texts and formats of one language."""

    language: Language

    def _(self, message: str, **values: object) -> str:
        text = translations(self.language).gettext(message)
        return text % values if values else text

    def n_(self, singular: str, plural: str, count: int, **values: object) -> str:
        text = translations(self.language).ngettext(singular, plural, count)
        return text % {"count": count, **values}

    def datetime_text(self, when: datetime, tz: ZoneInfo) -> str:
        """``24.12.2026, 22:00 Uhr`` / ``24 Dec 2026, 22:00`` (seconds only when set)."""
        local = when.astimezone(tz)
        table = _DATETIME_SECONDS if local.second else _DATETIME
        return format_datetime(local, table[self.language], tzinfo=tz, locale=self.language)

    def date_text(self, when: datetime, tz: ZoneInfo) -> str:
        return format_datetime(when, _DATE[self.language], tzinfo=tz, locale=self.language)

    def time_text(self, when: datetime, tz: ZoneInfo) -> str:
        return format_datetime(when, _TIME[self.language], tzinfo=tz, locale=self.language)

    def duration(self, span: timedelta) -> str:
        """``1 h 20 min`` / ``1 Std. 20 Min.``; under a minute: ``under 1 min``."""
        minutes = int(span.total_seconds() // 60)
        if minutes < 1:
            return self._("under 1 min")
        hours, minutes = divmod(minutes, 60)
        days, hours = divmod(hours, 24)
        parts = []
        if days:
            parts.append(self.n_("%(count)d day", "%(count)d days", days))
        if hours:
            parts.append(self._("%(hours)d h", hours=hours))
        if minutes:
            parts.append(self._("%(minutes)d min", minutes=minutes))
        return " ".join(parts)

    def weekdays(self, days: Sequence[str]) -> str:
        """``Mon, Wed`` / ``Mo., Mi.`` from ISO day abbreviations."""
        names = get_day_names("abbreviated", locale=self.language)
        return ", ".join(names[_ISO_DAYS.index(d)] for d in days if d in _ISO_DAYS)


@functools.cache
def translator(language: str) -> Translator:
    return Translator(language_of(language))


def message_time(t: Translator, when: datetime, tz: ZoneInfo) -> str:
    """A time in an e-mail, notice, call or calendar entry: English keeps the form these
    texts always had (``2026-12-24 22:00``, unambiguous for every English reader); other
    languages use their own (``24.12.2026, 22:00 Uhr``)."""
    if t.language == SOURCE_LANGUAGE:
        return local_text(when, tz)
    return t.datetime_text(when, tz)


def locale_name(language: str) -> str:
    """The language's own name (``Deutsch``, ``English``), for a language switch."""
    try:
        return str(Locale.parse(language).get_display_name(language) or language).capitalize()
    except (UnknownLocaleError, ValueError):
        return language


# -- maintaining the catalogue -------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (
    ("notify/templates/**", "jinja2.ext:babel_extract"),
    ("notify/**.py", "python"),
    ("bot/statuspage/**.py", "python"),
    ("bot/calendar_feed.py", "python"),
)
_JINJA_OPTIONS = {"extensions": "jinja2.ext.i18n", "trim_blocks": "true", "lstrip_blocks": "true"}
KEYWORDS = {"_": None, "n_": (1, 2)}


def extract() -> Catalog:
    """Every marked text of the sources, as a template catalogue."""
    from babel.messages.extract import extract_from_dir  # noqa: PLC0415

    catalog = Catalog(project="tgops", domain=DOMAIN, charset="utf-8")
    method_map = [(pattern, method) for pattern, method in SOURCES]
    options_map = {"notify/templates/**": _JINJA_OPTIONS}
    for filename, lineno, message, comments, context in extract_from_dir(
        str(ROOT),
        method_map=method_map,
        options_map=options_map,
        keywords=KEYWORDS,
        strip_comment_tags=True,
    ):
        catalog.add(message, None, [(filename, lineno)], auto_comments=comments, context=context)
    return catalog


def missing(language: str, template: Catalog | None = None) -> list[str]:
    """Texts of the sources without a translation (untranslated, fuzzy or not in the .po)."""
    template = template or extract()
    with po_path(language).open("rb") as handle:
        catalog = read_po(handle, locale=language, domain=DOMAIN)
    problems = []
    for message in template:
        if not message.id:
            continue
        found = catalog.get(message.id, context=message.context)
        if found is None or found.fuzzy or not _translated(found.string):
            key = message.id if isinstance(message.id, str) else message.id[0]
            problems.append(f"{language}: no translation of {key!r}")
    return problems


def _translated(value: object) -> bool:
    return all(value) if isinstance(value, tuple | list) else bool(value)


def _main(argv: Sequence[str]) -> int:
    from babel.messages.pofile import write_po  # noqa: PLC0415

    command = argv[0] if argv else ""
    others = [lang for lang in LANGUAGES if lang != SOURCE_LANGUAGE]
    if command == "compile":
        for language in others:
            mo_path(language).write_bytes(compile_catalogue(language))
        return 0
    if command == "extract":
        template = extract()
        with (LOCALE_DIR / f"{DOMAIN}.pot").open("wb") as handle:
            write_po(handle, template, omit_header=False, sort_output=True, width=100)
        for language in others:
            with po_path(language).open("rb") as handle:
                catalog = read_po(handle, locale=language, domain=DOMAIN)
            catalog.update(template, no_fuzzy_matching=True)
            with po_path(language).open("wb") as handle:
                write_po(handle, catalog, sort_output=True, width=100, ignore_obsolete=True)
        return 0
    if command == "check":
        template = extract()
        problems = [p for language in others for p in missing(language, template)]
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    print("usage: python -m notify.i18n compile|extract|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
