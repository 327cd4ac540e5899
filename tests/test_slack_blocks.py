"""Block Kit payloads of long replies, validated with slack_sdk's own block models."""

from __future__ import annotations

import html
import re

import pytest
from slack_sdk.models.blocks import Block

from bot.slack.blocks import SECTION_LIMIT, Shown, body_blocks, chunks, reply_message

BROKEN_ENTITY = re.compile(r"&(?!amp;|lt;|gt;)")


def sections(payload: list[dict[str, object]]) -> list[str]:
    texts = []
    for raw in payload:
        block = Block.parse(raw)  # type: ignore[arg-type]
        assert block is not None
        block.validate_json()  # raises on a text over Slack's limits
        if raw["type"] == "section":
            text = raw["text"]
            assert isinstance(text, dict)
            texts.append(str(text["text"]))
    return texts


def boundary_cases() -> list[str]:
    """Texts whose split points fall on, before and after the characters Slack escapes."""
    cases = []
    limit = SECTION_LIMIT - 8
    for offset in range(-6, 7):
        for special in ("&", "<", ">", "&<>", "<&>&"):
            head = "a" * (limit - 20 + offset)
            cases.append(head + special * 40 + "\n" + "b&c<d>e " * 500)
    cases.append("&" * 10_000)  # one line, nothing but escapes
    cases.append("\n".join("<tg1> & <tg2> " * 30 for _ in range(60)))
    return cases


@pytest.mark.parametrize("text", boundary_cases())
def test_long_replies_are_split_first_then_escaped(text: str) -> None:
    for preformatted in (False, True):
        blocks = body_blocks(text, preformatted=preformatted, prefix=":no_entry: ")
        texts = sections(blocks)  # every block passes slack_sdk's validation
        assert all(len(t) <= 3000 for t in texts)
        assert not any(BROKEN_ENTITY.search(t) for t in texts), "an escape was cut in two"
        pieces = [t.removeprefix(":no_entry: ") for t in texts]
        if preformatted:
            pieces = [p.removeprefix("```").removesuffix("```") for p in pieces]
        shown = [html.unescape(p) for p in pieces]
        if len(blocks) == len(texts):  # all of it shown (no "more lines" note)
            assert "".join(shown).replace("\n", "") == text.replace("\n", "")


def test_the_fallback_text_is_cut_before_it_is_escaped() -> None:
    message = reply_message(Shown(text="&" * 5000, ok=True, preformatted=False), alerts=[])
    text = str(message["text"])
    assert len(text) <= 3000
    assert not BROKEN_ENTITY.search(text)
    assert text == "&amp;" * 600


def test_chunks_measure_escaped_size_only_when_asked() -> None:
    assert chunks("&&&&", 8) == ["&&&&"]
    assert chunks("&&&&", 8, escaped=True) == ["&", "&", "&", "&"]
    assert chunks("a<b\nc>d", 20, escaped=True) == ["a<b\nc>d"]
