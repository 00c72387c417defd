"""The playground and /docs in a real browser against a live server (one real TensorFlow worker).

Numbers read from the page are compared with closed forms; plots are checked by their data and by
their pixels; screenshots go to tests/playground/artifacts/ for a person to look at.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

from tests.conftest import LiveServer
from tests.playground.conftest import Guarded, open_guarded_page

# The page answers within a second or two; this only bounds a hang (a worker compiling cold may be slow).
WAIT_MS = 30_000
FINISHED = "body[data-state=done], body[data-state=error]"


def open_playground(guarded: Guarded, server: LiveServer, hash_: str = "") -> Any:
    page = guarded.page
    page.goto(f"{server.url}/{hash_}")
    page.wait_for_selector(FINISHED, timeout=WAIT_MS)  # the page runs its state once on load
    return page


def run(page: Any) -> str:
    """Click Run and wait for that run to finish; returns 'done' or 'error'."""
    page.click("#run")  # the click handler marks the body 'running' before it awaits anything
    page.wait_for_selector(FINISHED, timeout=WAIT_MS)
    state: str = page.get_attribute("body", "data-state")
    return state


def number(page: Any, key: str) -> float:
    value = page.get_attribute(f'[data-key="{key}"]', "data-value")
    assert value is not None, f"no result cell {key}"
    return float(value)


def set_derivatives(page: Any, *wanted: str) -> None:
    for name in ("gradient", "jacobian", "hessian", "hvp", "jvp", "vjp"):
        page.set_checked(f'input[name="derivative"][value="{name}"]', name in wanted)


def series_pixels(page: Any, selector: str, colors: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """How many pixels of the canvas are (close to) each color."""
    counts: dict[str, int] = page.evaluate(
        """([selector, colors]) => {
            const canvas = document.querySelector(selector);
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            const counts = {};
            for (const [name, [r, g, b]] of Object.entries(colors)) {
                let n = 0;
                for (let k = 0; k < data.length; k += 4) {
                    if (data[k + 3] > 200 && Math.abs(data[k] - r) < 30 && Math.abs(data[k + 1] - g) < 30
                        && Math.abs(data[k + 2] - b) < 30) n += 1;
                }
                counts[name] = n;
            }
            return counts;
        }""",
        [selector, colors],
    )
    return counts


def test_one_variable_table_and_plot_match_closed_forms(
    guarded: Guarded, ready_server: LiveServer, artifacts: Path
) -> None:
    page = open_playground(guarded, ready_server)
    page.fill("#expression", "sin(x) * x**2")
    page.fill("#variables", "x = 0.7")
    set_derivatives(page, "gradient", "hessian")
    page.select_option("#dtype", "float64")
    page.set_checked("#plot-enabled", True)
    page.fill("#x-min", "-2")
    page.fill("#x-max", "3")
    page.fill("#points", "101")
    assert run(page) == "done"

    x = 0.7
    assert number(page, "value") == pytest.approx(math.sin(x) * x**2, rel=1e-12)
    assert number(page, "gradient.x") == pytest.approx(math.cos(x) * x**2 + 2 * x * math.sin(x), rel=1e-12)
    d2 = -math.sin(x) * x**2 + 4 * x * math.cos(x) + 2 * math.sin(x)
    assert number(page, "hessian.x.x") == pytest.approx(d2, rel=1e-12)
    # What the table shows is the number, rounded for reading.
    assert float(page.inner_text('[data-key="gradient.x"]')) == pytest.approx(
        number(page, "gradient.x"), rel=1e-9
    )

    # The plot: f, f', f'' on the chosen grid, from one batched request, against the closed forms...
    plot = page.evaluate("window.tapeservePlayground.plotState")
    assert plot["kind"] == "1d"
    xs = np.array(plot["data"]["x"])
    assert len(xs) == 101 and xs[0] == -2 and xs[-1] == 3
    np.testing.assert_allclose(plot["data"]["f"], np.sin(xs) * xs**2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(plot["data"]["d1"], np.cos(xs) * xs**2 + 2 * xs * np.sin(xs), atol=1e-12)
    np.testing.assert_allclose(
        plot["data"]["d2"], -np.sin(xs) * xs**2 + 4 * xs * np.cos(xs) + 2 * np.sin(xs), atol=1e-12
    )
    # ...and actually drawn: each series' color covers pixels of the canvas.
    counts = series_pixels(
        page, "#plot1d canvas", {"f": (31, 95, 191), "d1": (217, 72, 15), "d2": (43, 138, 62)}
    )
    assert all(n > 100 for n in counts.values()), counts
    page.screenshot(path=str(artifacts / "playground-1d.png"), full_page=True)


def test_two_variables_contours_and_gradient_arrows(
    guarded: Guarded, ready_server: LiveServer, artifacts: Path
) -> None:
    page = open_playground(guarded, ready_server)
    page.fill("#expression", "x**2 + 3*y**2 - x*y")
    page.fill("#variables", "x = 1\ny = -0.5")
    set_derivatives(page, "gradient", "hessian")
    page.fill("#x-min", "-2")
    page.fill("#x-max", "2")
    page.fill("#y-min", "-1.5")
    page.fill("#y-max", "1.5")
    page.fill("#grid", "31")
    assert run(page) == "done"

    assert number(page, "value") == pytest.approx(1 + 0.75 + 0.5, rel=1e-12)
    assert number(page, "gradient.x") == pytest.approx(2 * 1 - (-0.5), rel=1e-12)
    assert number(page, "gradient.y") == pytest.approx(6 * -0.5 - 1, rel=1e-12)
    hessian = [[number(page, f"hessian.{a}.{b}") for b in "xy"] for a in "xy"]
    assert hessian == [[2.0, -1.0], [-1.0, 6.0]]

    plot = page.evaluate("window.tapeservePlayground.plotState")
    assert plot["kind"] == "2d"
    gx, gy = np.meshgrid(np.linspace(-2, 2, 31), np.linspace(-1.5, 1.5, 31))  # rows are y, as the page sends
    np.testing.assert_allclose(plot["data"]["values"], (gx**2 + 3 * gy**2 - gx * gy).ravel(), atol=1e-12)
    np.testing.assert_allclose(plot["data"]["gx"], (2 * gx - gy).ravel(), atol=1e-12)
    np.testing.assert_allclose(plot["data"]["gy"], (6 * gy - gx).ravel(), atol=1e-12)
    assert page.is_visible("#plot2d")
    arrows = int(page.get_attribute("#plot2d", "data-arrows") or 0)
    assert arrows >= 100  # 16 x 16 sub-grid points, minus the one stationary point drawn as a dot
    # Pixels: the heatmap spans the colormap's ends (dark violet near the minimum, yellow at a corner).
    counts = series_pixels(page, "#plot2d", {"violet": (68, 1, 84), "yellow": (253, 231, 37)})
    assert counts["violet"] > 50 and counts["yellow"] > 50, counts
    page.screenshot(path=str(artifacts / "playground-2d.png"), full_page=True)


def test_parse_error_shows_the_caret_under_the_offending_text(
    guarded: Guarded, ready_server: LiveServer, artifacts: Path
) -> None:
    page = open_playground(guarded, ready_server)
    page.fill("#expression", "sum(x +")
    page.fill("#variables", "x = 1, 2")
    assert run(page) == "error"
    assert "parse_error" in page.inner_text("#error-code")
    assert "ends too early" in page.inner_text("#error-detail")
    snippet = page.inner_text("#error-snippet").split("\n")
    assert snippet[0] == "sum(x +"
    column = int(page.get_attribute("#expression-mark", "data-column") or 0)
    assert column == 8 and snippet[1].index("^") == column - 1  # under the missing operand
    assert page.inner_text("#results") == ""
    page.screenshot(path=str(artifacts / "playground-parse-error.png"))

    # On a later line the editor marks that line's character.
    page.fill("#expression", "x +\n  * 2")
    assert run(page) == "error"
    mark = page.query_selector("#expression-mark")
    assert mark is not None and mark.get_attribute("data-line") == "2"
    snippet = page.inner_text("#error-snippet").split("\n")
    assert snippet[1].index("^") == int(mark.get_attribute("data-column") or 0) - 1
    assert snippet[0][snippet[1].index("^")] == "*"
    assert mark.inner_text() == "*"

    # An unknown name: its suggestions; a bad value in the variables box: said before any request.
    page.fill("#expression", "sinn(x)")
    assert run(page) == "error"
    assert "unknown_name" in page.inner_text("#error-code")
    assert "did you mean" in page.inner_text("#error-detail") and "sin" in page.inner_text("#error-detail")
    page.fill("#expression", "x")
    page.fill("#variables", "x = 1, two")
    assert run(page) == "error"
    assert page.inner_text("#error-detail") == 'variables, line 1 (x): "two" is not a number'
    assert "has-error" in (page.get_attribute("#variables", "class") or "")


def test_state_round_trips_through_the_url(guarded: Guarded, ready_server: LiveServer, browser: Any) -> None:
    page = open_playground(guarded, ready_server)
    page.fill("#expression", "sq(x) + c")
    page.fill("#variables", "x = 2")
    page.fill("#constants", "c = 10")
    set_derivatives(page, "gradient")
    page.select_option("#order", "2")
    page.click("#add-function")
    row = "#functions tbody tr:last-child"
    page.fill(f"{row} .fn-name", "sq")
    page.fill(f"{row} .fn-params", "x")  # typing the params makes one gradient field per param
    page.fill(f"{row} .fn-body", "x**2")
    # A deliberately different custom gradient, so the answer proves it was used (true one: 2x).
    page.fill(f'{row} input.fn-grad[data-param="x"]', "dy * 3 * x")
    page.fill("#x-min", "-1")
    page.fill("#x-max", "1.5")
    assert run(page) == "done"
    assert number(page, "value") == 14.0
    assert number(page, "gradient.x") == 6.0
    assert number(page, "derivative.1") == 6.0 and number(page, "derivative.2") == 3.0
    url = page.url
    assert "#" in url and quote("sq(x)") in url

    # A fresh browser context (no shared storage) opening the link restores and computes the same.
    other = open_guarded_page(browser)
    try:
        restored = open_playground(other, ready_server, "#" + url.split("#", 1)[1])
        assert restored.get_attribute("body", "data-state") == "done"
        assert restored.input_value("#expression") == "sq(x) + c"
        assert restored.input_value("#variables") == "x = 2"
        assert restored.input_value("#constants") == "c = 10"
        assert restored.input_value("#order") == "2"
        assert restored.is_checked('input[value="gradient"]')
        assert not restored.is_checked('input[value="hessian"]')
        assert restored.input_value(f"{row} .fn-name") == "sq"
        assert restored.input_value(f'{row} input.fn-grad[data-param="x"]') == "dy * 3 * x"
        assert restored.input_value("#x-min") == "-1" and restored.input_value("#x-max") == "1.5"
        assert number(restored, "value") == 14.0 and number(restored, "gradient.x") == 6.0
        assert other.outside_requests == [] and other.page_errors == []
    finally:
        other.context.close()


def test_api_key_is_kept_in_the_session_and_sent_as_bearer(
    guarded: Guarded, ready_server: LiveServer
) -> None:
    page = open_playground(guarded, ready_server)
    sent: list[str | None] = []
    page.on(
        "request",
        lambda request: (
            sent.append(request.headers.get("authorization")) if "/v1/gradient" in request.url else None
        ),
    )
    assert run(page) == "done"
    assert sent and all(header is None for header in sent)  # no key: no header (keys are optional)

    page.fill("#api-key", "k-123")
    sent.clear()
    assert run(page) == "done"
    assert sent and all(header == "Bearer k-123" for header in sent)  # the table's and the plot's
    page.reload()
    page.wait_for_selector(FINISHED, timeout=WAIT_MS)
    assert page.input_value("#api-key") == "k-123"  # kept for the session (tab), never in the URL
    assert "k-123" not in page.url

    # A server that refuses the key: its problem is shown with what to do.
    refusal = (
        '{"type": "urn:tapeserve:problem:unauthorized", "title": "Unauthorized", "status": 401,'
        ' "code": "unauthorized", "detail": "the API key is not valid"}'
    )
    page.route(
        "**/v1/gradient",
        lambda route: route.fulfill(status=401, content_type="application/problem+json", body=refusal),
    )
    assert run(page) == "error"
    assert "unauthorized" in page.inner_text("#error-code")
    assert "The API key was refused" in page.inner_text("#error-detail")
    page.unroute("**/v1/gradient")

    page.click("#forget-key")
    sent.clear()
    assert run(page) == "done"
    assert sent and all(header is None for header in sent)


def test_docs_render_swagger_ui_from_local_files(
    guarded: Guarded, ready_server: LiveServer, artifacts: Path
) -> None:
    page = guarded.page
    page.goto(f"{ready_server.url}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=WAIT_MS)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert any("/v1/gradient" in p for p in paths)
    assert "tapeserve" in page.inner_text(".info .title")
    page.screenshot(path=str(artifacts / "docs.png"))
    # The guard fixture asserts that no request left 127.0.0.1.
