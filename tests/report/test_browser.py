"""The HTML report in a real browser: headless Chromium, network off, no console errors, every
section and chart present (tests/report/browser.py drives it over the DevTools protocol)."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import Browser, find_chromium

from qdq.cli import main

from conftest import DIGITS

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="no Chromium on PATH: `apt-get install chromium` (.ci/run does)"
)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`qdq quantize --report` of the digits CNN (the report measures on --calib)."""
    folder = tmp_path_factory.mktemp("page")
    code = main(
        [
            "quantize",
            str(DIGITS / "cnn.onnx"),
            "-o",
            str(folder / "cnn_int8.onnx"),
            "--calib",
            str(DIGITS / "calib.npz"),
            "--report",
            str(folder / "report.html"),
            "--sensitivity",
        ]
    )
    assert code == 0
    return folder / "report.html"


@pytest.mark.exact_int8
def test_the_report_opens_offline_without_console_errors(page, tmp_path):
    with Browser() as browser:
        browser.open(page)
        drawn = browser.evaluate("window.qdqDrawAll().then(() => true)")
        counts = browser.evaluate(
            """({
            summary: document.querySelector("#summary table").innerText,
            int8_rows: document.querySelectorAll("#layer-table tr[data-decision=int8]").length,
            rows: document.querySelectorAll("#layer-table tbody tr").length,
            charts: document.querySelectorAll("div.chart").length,
            plots: document.querySelectorAll("div.chart.js-plotly-plot svg.main-svg").length,
            histograms: document.querySelectorAll("#activations div.chart").length,
            weights: document.querySelectorAll("#weights div.chart").length,
            layer_chart: document.querySelectorAll("#layers div.chart").length,
            profile: document.querySelectorAll("#profile div.chart").length,
            })"""
        )
        browser.screenshot(tmp_path / "report.png")
        assert drawn
        assert browser.console_errors() == []
        assert browser.requests() == []  # nothing but the file itself
    assert "size" in counts["summary"]
    assert "latency" in counts["summary"]
    assert counts["int8_rows"] == counts["rows"] == 10  # "10 of 10 nodes quantized"
    assert counts["histograms"] == 7  # the input and the six activations after it
    assert counts["weights"] == 4  # three convolutions and the classifier
    assert counts["layer_chart"] == counts["profile"] == 1
    assert counts["plots"] >= counts["charts"] == 13  # every chart drawn
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_page_error_is_seen(tmp_path):
    """The check above would catch a broken page: a script error shows as a console error."""
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>console.error('boom'); undefinedCall();</script>")
    with Browser() as browser:
        browser.open(broken)
        errors = browser.console_errors()
    assert any("boom" in e for e in errors)
    assert any("undefinedCall" in e for e in errors)
