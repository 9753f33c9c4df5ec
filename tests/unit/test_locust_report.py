"""The LLM samples' own outputs: the CSV reads back as written, the HTML section goes into locust's
report once, at the end of its body."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.locust_report import (
    HTML_SECTION_ID,
    Row,
    add_section_to_html,
    html_section,
    llm_csv_path,
    rows_from_csv,
    write_csv,
)

pytestmark = pytest.mark.unit

ROWS = [
    Row("E2E", "all models", 10, 1, 2.5, 0.25, 812.5, 800.0, 950.0, 990.0, 0.0),
    Row("ITL", "qwen2", 300, 0, 75.0, 0.0, 20.25, 20.0, 24.0, 31.0, 0.0),
    Row("TOKENS/S", "qwen2 (tok/s, not ms)", 9, 0, 2.25, 0.0, 48.5, 48.0, 60.0, 61.0, 1152.0),
]


def test_csv_reads_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "run_llm_stats.csv"
    write_csv(path, ROWS)
    assert rows_from_csv(path) == ROWS


def test_llm_csv_sits_next_to_locusts() -> None:
    assert llm_csv_path(Path("r/run_stats.csv")) == Path("r/run_llm_stats.csv")
    assert llm_csv_path(Path("r/run_llm_stats.csv")) == Path("r/run_llm_stats.csv")


def test_html_section_goes_at_the_end_of_the_body_once(tmp_path: Path) -> None:
    page = tmp_path / "run.html"
    page.write_text('<html><body><div id="root"></div><script>x</script></body></html>')
    section = html_section(ROWS, "| qwen2 | <summary> |")
    assert add_section_to_html(page, section) and add_section_to_html(page, section)
    text = page.read_text()
    assert text.count(f'id="{HTML_SECTION_ID}"') == 1
    assert text.index("<script>x</script>") < text.index(HTML_SECTION_ID) < text.index("</body>")
    assert "<td>ITL</td>" in text and "&lt;summary&gt;" in text  # escaped
    assert not add_section_to_html(tmp_path / "missing.html", section)
