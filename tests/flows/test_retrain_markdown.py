"""The retrain report is Markdown that Prefect's UI renders: data in it must stay text."""

from __future__ import annotations

from flows.retrain import render_markdown


def _summary(reference: str, generated: str) -> dict:
    return {"data_dir": "/d", "checkpoint": "/c",
            "registration": {"name": "m", "version": "1", "promoted": True, "reason": "first"},
            "report": {"metrics": {"bleu4": 0.5},
                       "examples": [{"key": "k|1", "generated": generated, "references": [reference]}]}}


def test_captions_in_the_report_are_text_not_html_or_table_cells():
    markdown = render_markdown(_summary("<script>alert(1)</script> a | b", "*bold* [x](http://e) `c`\nnext"))
    assert "<script>" not in markdown and "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown
    (row,) = [line for line in markdown.splitlines() if line.startswith("| k")]
    assert row == r"| k\|1 | \*bold\* \[x\](http://e) \`c\` next | &lt;script&gt;alert(1)&lt;/script&gt; a \| b |"


def test_md_text_keeps_plain_captions_as_they_are():
    from flows.retrain import md_text

    assert md_text("a red circle left of a blue square") == "a red circle left of a blue square"
    assert md_text("x < 5 & y") == "x &lt; 5 &amp; y"
