"""The comparison report: self-contained, escaped, robust to missing metrics, and clean in a real browser."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from markupsafe import escape

from tuneoff.compare.report import frontier, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"
CHROMIUM = Path("/usr/bin/chromium")
# As in tests/feedback/test_browser.py: Debian's Chromium as root in a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
HOSTILE_ARM = "<script>alert(1)</script>"
HOSTILE_TEXT = "<img src=x onerror=alert(1)>"
PLOTS = ["gold-vs-kl", "hacking", "diversity", "cost", "training"]


def fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def hostile() -> dict:
    """The fixture with the dpo arm renamed to a script tag and model text that is an <img> with an onerror."""
    results = fixture()
    results["arms"] = {HOSTILE_ARM if name == "dpo" else name: m for name, m in results["arms"].items()}
    results["win_rates"] = {
        HOSTILE_ARM if a == "dpo" else a: {HOSTILE_ARM if b == "dpo" else b: r for b, r in row.items()}
        for a, row in results["win_rates"].items()
    }
    arm = results["arms"][HOSTILE_ARM]
    arm["description"] = HOSTILE_TEXT
    arm["per_seed"]["0"]["samples"][0] = {
        "prompt": HOSTILE_TEXT,
        "response": f"nice film {HOSTILE_TEXT} & more",
        "gold": 0.5,
    }
    results["notes"].append(f"note {HOSTILE_TEXT}")
    results["environment"]["cpu"] = HOSTILE_TEXT
    return results


def test_the_report_is_self_contained(tmp_path):
    path = write_report(fixture(), tmp_path / "report.html")
    assert path == tmp_path / "report.html"
    html = path.read_text(encoding="utf-8")
    assert not re.search(
        r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", html, re.I
    )  # no remote (or protocol-relative) URL
    assert not re.search(r"<(?:script|link|img|iframe|object|embed)\b|@import|url\(\s*['\"]?(?:https?:)?//", html, re.I)
    assert html.count("<svg") == len(PLOTS) and "<?xml" not in html and "<!DOCTYPE svg" not in html
    for name in fixture()["arms"]:
        assert f'<th class="arm">{escape(name)}' in html
    assert "Use <b>dpo</b>" in html  # balanced priorities in the fixture: the best tuned arm (base is the reference)
    assert "sft+ppo has the highest gold reward, 0.767 [0.704, 0.829], vs grpo 0.745 [0.633, 0.857]" in html
    assert "KL spike at step 120" in html  # the notes


def test_hostile_text_is_escaped_in_html_and_svg(tmp_path):
    html = write_report(hostile(), tmp_path / "report.html").read_text(encoding="utf-8")
    assert HOSTILE_ARM not in html and HOSTILE_TEXT not in html
    assert "<script" not in html.lower() and "<img" not in html.lower()
    assert str(escape(HOSTILE_ARM)) in html and str(escape(HOSTILE_TEXT)) in html
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(svgs) == len(PLOTS)
    assert any(
        "&lt;script&gt;alert(1)&lt;/script&gt;" in svg for svg in svgs
    )  # legend and tick labels, escaped by matplotlib


def test_missing_metrics_one_seed_and_no_curves(tmp_path):
    results = fixture()
    for m in results["arms"].values():
        for key in ("gold_reward", "kl_per_token", "mean_length_tokens"):
            m[key].update(ci_low=math.nan, ci_high=math.nan, n=1)
        m["proxy_reward"] = m["win_rate_vs_base"] = m["length_controlled_win_rate_vs_base"] = m["overoptimization"] = (
            None
        )
        m["stability"] = {"seed_sd": math.nan, "seed_range": 0.0, "divergence_events": 0, "final_gold_proxy_gap": None}
        m["per_seed"] = {"0": {**m["per_seed"]["0"], "curve": []}}
    results["arms"]["sft"]["diversity"] = None
    results["arms"]["sft"]["cost"] = {"wall_s": None}
    del results["arms"]["grpo"]["per_seed"]
    for key in ("win_rates", "environment", "notes", "seeds", "config", "priorities"):
        del results[key]
    results["shared"] = {
        "gold_judge": {"dev_accuracy": 0.82, "test_accuracy": None},
        "proxy_rm": None,
    }  # as aggregate writes them
    html = write_report(results, tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.count("<svg") == 3  # gold vs KL (final points), diversity, cost; no curves for the other two
    assert html.count("No data for this plot in these results.") == 2
    assert "is unknown: at least one has no 95% confidence interval" in html
    assert "No wall time for sft" in html and "n/a" in html
    assert '<th class="arm">test accuracy</th><td>n/a</td>' in html and "<h3>proxy reward model</h3>" not in html


def test_nothing_but_arm_names(tmp_path):
    html = write_report({"arms": {"a": {}, "b": {"method": "base"}}}, tmp_path / "report.html").read_text(
        encoding="utf-8"
    )
    assert html.count("No data for this plot in these results.") == len(PLOTS) and "<svg" not in html


def test_a_stored_recommendation_wins_and_bad_priorities_are_shown(tmp_path):
    results = fixture()
    results["recommendation"] = {"choice": "sft", "explanation": ["Chosen by hand."], "within_noise": False}
    html = write_report(results, tmp_path / "stored.html").read_text(encoding="utf-8")
    assert "Use <b>sft</b>" in html and "Chosen by hand." in html
    results = fixture()
    results["priorities"] = {"preset": "cheap"}
    html = write_report(results, tmp_path / "bad.html").read_text(encoding="utf-8")
    assert "No recommendation: priorities: unknown preset &#39;cheap&#39;" in html


def test_awkward_arm_names_are_drawn_as_written(tmp_path):
    results = fixture()
    results["arms"] = {
        {"dpo": "$\\frac{a}{b}$", "grpo": "_grpo"}.get(name, name): m for name, m in results["arms"].items()
    }
    html = write_report(results, tmp_path / "report.html").read_text(encoding="utf-8")
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert any("$\\frac{a}{b}$</text>" in svg for svg in svgs)  # drawn as written, not as mathtext
    assert any(" _grpo</text>" in svg for svg in svgs)  # in the legend, not hidden by its leading underscore


def test_frontier_is_the_upper_envelope():
    points = [(0.0, 0.5), (0.35, 0.64), (0.3, 0.7), (0.45, 0.745), (0.63, 0.767), (0.5, 0.7), (0.3, 0.6)]
    assert frontier(points) == [(0.0, 0.5), (0.3, 0.7), (0.45, 0.745), (0.63, 0.767)]


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)"
)
def test_the_report_in_headless_chromium(tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    path = write_report(hostile(), tmp_path / "report.html")
    errors, dialogs, requests = [], [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        boxes = page.eval_on_selector_all(
            "figure.plot svg",
            "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; })",
        )
        texts = page.eval_on_selector_all("figure.plot svg text", "els => els.map(e => e.textContent)")
        shown = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == [] and dialogs == []
    assert requests == [path.as_uri()]  # nothing else fetched: no <img src=x>, no fonts, no scripts
    assert len(boxes) == len(PLOTS) and all(width > 300 and height > 150 for width, height in boxes), boxes
    assert HOSTILE_ARM in texts and HOSTILE_ARM in shown and HOSTILE_TEXT in shown  # shown as text
    image = Image.open(tmp_path / "report.png")
    assert image.format == "PNG" and image.width == 1280 and image.height > 4000
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 200  # plots and text, not a blank page
