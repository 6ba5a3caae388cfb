"""The comparison's report: one self-contained HTML file (no scripts, no external URLs) from ``results.json``.

Plots are drawn with matplotlib and inlined as SVG with ``svg.fonttype = none``, so their text stays text.
matplotlib's SVG writer escapes that text (arm names can come from a hostile config), and mathtext is
switched off for it by escaping ``$``. Everything else from the results, above all prompts and model
outputs, goes through jinja2's autoescape. The only markup marked safe is the SVG made here.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

from tuneoff.compare.recommend import (
    AXES,
    ci_mean,
    finite,
    format_ci,
    format_number,
    format_seconds,
    get_path,
    recommend,
)
from tuneoff.errors import TuneoffError

STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "tuneoff",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "legend.fontsize": 8,
}
PHASES = ("data", "generation", "training", "scoring")
PHASE_COLORS = ("#8da0cb", "#66c2a5", "#fc8d62", "#e5c494")
SCOPE_COLORS = {"per_input": "#4c72b0", "across_input": "#dd8452"}
PROXY_COLOR, GOLD_COLOR = "#c44e52", "#2a7f62"
SAMPLES_PER_ARM = 4


def write_report(results: dict, path) -> Path:
    """Write the report for ``results`` (the ``results.json`` dict) to ``path`` and return the path."""
    import matplotlib
    from jinja2 import Environment, PackageLoader, select_autoescape

    arms = results.get("arms") or {}
    with matplotlib.rc_context(STYLE):
        plots = _plots(arms, _colors(arms))
    recommendation = _recommendation(results)
    env = Environment(loader=PackageLoader("tuneoff", "templates"), autoescape=select_autoescape(["html"]))
    html = env.get_template("compare_report.html").render(
        r=results,
        arms=arms,
        plots=plots,
        summary=_summary_rows(arms),
        recommendation=recommendation,
        axis_rows=_axis_rows(recommendation),
        axes=AXES,
        cost=_cost_rows(arms),
        stability=_stability_rows(arms),
        win_rates=_win_rate_table(results, arms),
        shared=_shared(results),
        environment=_pairs(results.get("environment")),
        samples=_samples(arms),
        human=_human_section(results.get("human")),
        notes=_notes(results),
        config=json.dumps(results.get("config") or {}, indent=1, default=str),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


# --- numbers and tables --------------------------------------------------------------------------------------


def _human_section(human: dict | None) -> dict | None:
    """ "What people preferred": per arm its human win rate against base and Bradley–Terry strength, and the lines
    on agreement (between people, and of the automatic judge with them)."""
    if not human:
        return None
    rows = []
    for arm, strength in (human.get("bradley_terry") or {}).items():
        win = (human.get("win_rate_vs_base") or {}).get(arm)
        rows.append(
            {
                "arm": arm,
                "win": _cell(win) if win else {"value": "base" if arm == human.get("base") else "—", "ci": ""},
                "judgments": f"{win['n']:,} on {win['comparisons']:,}" if win else "",
                "strength": _cell(strength),
            }
        )
    return {"rows": rows, "lines": human_lines(human)[-3:]}


def human_lines(human: dict) -> list[str]:
    """The human block as the lines a person reads (``tuneoff label stats --experiment``; the report's notes)."""
    agreement, judge = human.get("agreement") or {}, human.get("judge_agreement") or {}
    lines = ["| arm | human win rate vs base (ties half) | judgments on comparisons | Bradley–Terry strength |",
             "|---|---|---|---|"]  # fmt: skip
    for arm, strength in (human.get("bradley_terry") or {}).items():
        win = (human.get("win_rate_vs_base") or {}).get(arm)
        cells = (format_ci(win), f"{win['n']:,} on {win['comparisons']:,}") if win else ("base", "")
        lines.append(f"| {arm} | {cells[0]} | {cells[1]} | {format_ci(strength)} |")
    lines += [
        f"{human.get('judgments', 0):,} judgments of {human.get('comparisons', 0):,} blind comparisons by "
        f"{len(human.get('annotators') or [])} people; 95% CIs bootstrap the comparisons; strengths are log-odds "
        f"with {human.get('base', 'base')} at 0 (P(i preferred to j) = σ(s_i − s_j)).",
        f"Agreement between people: Fleiss' kappa {format_number(agreement.get('fleiss_kappa'))} over "
        f"{agreement.get('fleiss_items', 0)} comparisons with two or more labels, Krippendorff's alpha "
        f"{format_number(agreement.get('krippendorff_alpha'))}.",
        f"The automatic judge agrees with the people on {format_number(judge.get('rate'))} "
        f"[{format_number(judge.get('ci_low'))}, {format_number(judge.get('ci_high'))}] of {judge.get('n', 0):,} "
        "judgments that picked a side.",
    ]
    return lines


def _cell(ci) -> dict:
    """A table cell: the mean, and the CI below it in small type."""
    mean, _, interval = format_ci(ci).partition(" [")
    return {"value": mean, "ci": f"[{interval}" if interval else ""}


def _summary_rows(arms: dict) -> list[dict]:
    columns = [
        ("gold_reward",),
        ("proxy_reward",),
        ("win_rate_vs_base",),
        ("length_controlled_win_rate_vs_base",),
        ("kl_per_token",),
        ("mean_length_tokens",),
        ("diversity", "across_input", "embedding"),
    ]
    rows = []
    for arm, m in arms.items():
        cells = [_cell(get_path(m, *keys)) for keys in columns]
        cells.append({"value": format_seconds(ci_mean(get_path(m, "cost", "wall_s"))), "ci": ""})
        rows.append(
            {"arm": arm, "method": m.get("method", ""), "description": m.get("description", ""), "cells": cells}
        )
    return rows


def _cost_rows(arms: dict) -> list[dict]:
    rows = []
    for arm, m in arms.items():
        cost = m.get("cost") or {}
        phases = cost.get("phases") or {}
        plain = [format_number(cost.get("labels"))] + [format_number(phases.get(phase)) for phase in PHASES]
        rows.append(
            {
                "arm": arm,
                "cells": [_cell(cost.get(key)) for key in ("wall_s", "cpu_s", "tokens", "flops", "peak_rss_mb")]
                + [{"value": value, "ci": ""} for value in plain],
            }
        )
    return rows


def _stability_rows(arms: dict) -> list[dict]:
    rows = []
    for arm, m in arms.items():
        stability, fit = m.get("stability") or {}, m.get("overoptimization") or {}
        cells = [
            format_number(stability.get(key))
            for key in ("seed_sd", "seed_range", "divergence_events", "final_gold_proxy_gap")
        ]
        rows.append(
            {"arm": arm, "cells": cells + [format_number(fit.get(key)) for key in ("alpha", "beta", "r2", "n")]}
        )
    return rows


def _win_rate_table(results: dict, arms: dict) -> dict | None:
    rates = results.get("win_rates") or {}
    if not rates:
        return None
    names = list(arms) or list(rates)
    empty = {"value": "", "ci": ""}
    return {
        "names": names,
        "rows": [
            {"arm": a, "cells": [_cell(get_path(rates, a, b)) if a != b else empty for b in names]} for a in names
        ],
    }


def _pairs(mapping) -> list[tuple[str, str]]:
    """Key–value rows of a flat dict; numbers formatted, None (not measured) as n/a, anything else as text."""
    if not isinstance(mapping, dict):
        return []
    return [
        (str(key).replace("_", " "), format_number(value) if value is None or finite(value) is not None else str(value))
        for key, value in mapping.items()
    ]


def _shared(results: dict) -> list[tuple[str, list]]:
    shared = results.get("shared") or {}
    titles = {"gold_judge": "gold judge", "labels": "preference labels", "proxy_rm": "proxy reward model"}
    return [
        (titles.get(name, str(name)), _pairs(values)) for name, values in shared.items() if isinstance(values, dict)
    ]


def _seeds(arm: dict) -> list[tuple[str, dict]]:
    per_seed = arm.get("per_seed") or {}
    return sorted(
        ((str(seed), run) for seed, run in per_seed.items() if isinstance(run, dict)),
        key=lambda pair: (not pair[0].isdigit(), int(pair[0]) if pair[0].isdigit() else 0, pair[0]),
    )


def _samples(arms: dict) -> list[dict]:
    """Per arm, the samples of its first seed that has any (prompts and responses are escaped by the template)."""
    shown = []
    for arm, m in arms.items():
        for seed, run in _seeds(m):
            rows = [s for s in run.get("samples") or [] if isinstance(s, dict)][:SAMPLES_PER_ARM]
            if rows:
                shown.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "rows": [
                            {
                                "prompt": str(s.get("prompt", "")),
                                "response": str(s.get("response", "")),
                                "gold": format_number(s.get("gold")),
                            }
                            for s in rows
                        ],
                    }
                )
                break
    return shown


def _notes(results: dict) -> list[str]:
    notes = results.get("notes") or []
    return [notes] if isinstance(notes, str) else [str(note) for note in notes]


def _recommendation(results: dict) -> dict:
    """The stored recommendation, else one computed here; a bad priorities setting is shown, not raised."""
    stored = results.get("recommendation")
    if isinstance(stored, dict) and stored.get("choice"):
        return stored
    try:
        return recommend(results, results.get("priorities"))
    except TuneoffError as error:
        return {"error": str(error)}


def _axis_rows(recommendation: dict) -> list[dict]:
    """Rows of the ranking: weighted score and per-axis scores, formatted (empty for a missing axis)."""

    def score(value) -> str:
        return "–" if finite(value) is None else f"{value:.2f}"

    return [
        {
            "arm": row.get("arm"),
            "score": score(row.get("score")),
            "axes": [score((row.get("axes") or {}).get(axis)) for axis in AXES],
        }
        for row in recommendation.get("ranking") or []
        if isinstance(row, dict)
    ]


# --- plots ---------------------------------------------------------------------------------------------------


def _colors(arms: dict) -> dict[str, str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab10"]
    return {arm: to_hex(palette(i % 10)) for i, arm in enumerate(arms)}


def _label(text) -> str:
    """Text for matplotlib drawn as written: ``$`` would start mathtext, a leading ``_`` hides a legend entry."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig):
    """The figure as inline SVG markup: XML prolog, doctype and metadata (which names URLs) removed."""
    from markupsafe import Markup

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    return Markup(svg)  # safe: made here, and matplotlib escapes every text it writes


def _err(ci) -> list[list[float]] | None:
    """Asymmetric error bar from a CI; None when its bounds are NaN (one seed)."""
    mean, low, high = ci_mean(ci), finite(get_path(ci, "ci_low")), finite(get_path(ci, "ci_high"))
    if mean is None or low is None or high is None:
        return None
    return [[max(0.0, mean - low)], [max(0.0, high - mean)]]


def _curve_mean(arm: dict, key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of one curve column at each logged step (seeds missing a step are left out of its mean)."""
    by_step: dict[int, list[float]] = {}
    for _, run in _seeds(arm):
        for row in run.get("curve") or []:
            value, step = finite(row.get(key)), finite(row.get("step"))
            if value is not None and step is not None:
                by_step.setdefault(int(step), []).append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper envelope of (KL, gold): the points no other point beats with less or equal KL."""
    envelope: list[tuple[float, float]] = []
    for kl, gold in sorted(points, key=lambda p: (p[0], -p[1])):
        if not envelope or gold > envelope[-1][1]:
            envelope.append((kl, gold))
    return envelope


def _plot_gold_vs_kl(arms: dict, colors: dict):
    fig = _figure(8, 4.4)
    ax = fig.add_subplot()
    finals, drawn = [], False
    for arm, m in arms.items():
        for _, run in _seeds(m):  # each seed's training trajectory, faint
            rows = [
                r
                for r in run.get("curve") or []
                if finite(r.get("kl")) is not None and finite(r.get("gold")) is not None
            ]
            if rows:
                ax.plot(
                    [r["kl"] for r in rows],
                    [r["gold"] for r in rows],
                    color=colors[arm],
                    alpha=0.3,
                    lw=1,
                    marker=".",
                    ms=3,
                )
                drawn = True
        x, y = ci_mean(m.get("kl_per_token")), ci_mean(m.get("gold_reward"))
        if x is not None and y is not None:
            ax.errorbar(
                [x],
                [y],
                xerr=_err(m.get("kl_per_token")),
                yerr=_err(m.get("gold_reward")),
                fmt="o",
                ms=7,
                capsize=3,
                color=colors[arm],
                markeredgecolor="white",
                label=_label(arm),
                zorder=3,
            )
            finals.append((x, y))
    if not finals and not drawn:
        return None
    envelope = frontier(finals)
    if len(envelope) > 1:
        ax.plot(*zip(*envelope), color="#333", ls="--", lw=1.2, label="frontier (final points)", zorder=2)
    ax.set_xlabel("KL(π ‖ base) per response token")
    ax.set_ylabel("gold reward")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _svg(fig)


def _plot_hacking(arms: dict):
    curves = {arm: (_curve_mean(m, "proxy"), _curve_mean(m, "gold")) for arm, m in arms.items()}
    curves = {arm: pair for arm, pair in curves.items() if pair[0][0] and pair[1][0]}
    if not curves:
        return None
    columns = min(len(curves), 3)
    rows = math.ceil(len(curves) / columns)
    fig = _figure(8, 2.9 * rows)
    grid = fig.subplots(rows, columns, squeeze=False)
    for ax, (arm, (proxy, gold)) in zip(grid.flat, curves.items()):
        ax.plot(*proxy, color=PROXY_COLOR, marker=".", label="proxy")
        ax.set_ylabel("proxy reward", color=PROXY_COLOR)
        twin = ax.twinx()  # two y axes: the proxy RM's and the gold judge's scales differ
        twin.plot(*gold, color=GOLD_COLOR, marker=".", label="gold")
        twin.set_ylabel("gold reward", color=GOLD_COLOR)
        twin.spines["right"].set_visible(True)
        twin.grid(False)
        ax.set_title(_label(arm))
        ax.set_xlabel("step")
    for ax in list(grid.flat)[len(curves) :]:
        ax.set_visible(False)
    return _svg(fig)


def _plot_diversity(arms: dict):
    metrics = [
        ("ead", "EAD\n(higher = more diverse)"),
        ("self_bleu", "self-BLEU\n(lower = more diverse)"),
        ("embedding", "embedding diversity\n(higher = more diverse)"),
    ]
    names = list(arms)
    if not any(
        ci_mean(get_path(m, "diversity", scope, metric)) is not None
        for m in arms.values()
        for scope in SCOPE_COLORS
        for metric, _ in metrics
    ):
        return None
    fig = _figure(8, 3.2)
    grid = fig.subplots(1, 3)
    width = 0.38
    legend = {}
    for ax, (metric, title) in zip(grid, metrics):
        for offset, (scope, color) in zip((-width / 2, width / 2), SCOPE_COLORS.items()):
            for i, arm in enumerate(names):
                ci = get_path(arms[arm], "diversity", scope, metric)
                if ci_mean(ci) is not None:
                    bars = ax.bar(i + offset, ci_mean(ci), width, yerr=_err(ci), color=color, capsize=2, ecolor="#333")
                    legend.setdefault(scope.replace("_", "-"), bars)
        ax.set_title(title)
        ax.set_xticks(range(len(names)), [_label(n) for n in names], rotation=30, ha="right")
        ax.grid(axis="x", visible=False)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=2)
    return _svg(fig)


def _plot_cost(arms: dict):
    names = [arm for arm, m in arms.items() if isinstance(get_path(m, "cost", "phases"), dict)]
    if not names:
        return None
    fig = _figure(8, 3.4)
    ax = fig.add_subplot()
    bottom = [0.0] * len(names)
    for phase, color in zip(PHASES, PHASE_COLORS):
        heights = [finite(get_path(arms[arm], "cost", "phases", phase)) or 0.0 for arm in names]
        ax.bar(range(len(names)), heights, 0.6, bottom=bottom, color=color, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(names)), [_label(n) for n in names])
    ax.set_ylabel("wall seconds (mean over seeds)")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _svg(fig)


def _plot_training(arms: dict, colors: dict):
    panels = [("loss", "train loss"), ("proxy", "proxy reward")]
    curves = {key: {arm: _curve_mean(m, key) for arm, m in arms.items()} for key, _ in panels}
    panels = [(key, title) for key, title in panels if any(steps for steps, _ in curves[key].values())]
    if not panels:
        return None
    fig = _figure(8, 3.2)
    grid = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(grid, panels):
        for arm, (steps, values) in curves[key].items():
            if steps:
                ax.plot(steps, values, color=colors[arm], marker=".", label=_label(arm))
        ax.set_title(f"{title} (mean over seeds)")
        ax.set_xlabel("step")
        ax.legend()
    return _svg(fig)


def _plots(arms: dict, colors: dict) -> list[dict]:
    specs = [
        (
            "gold-vs-kl",
            "Gold reward vs KL to the base model",
            lambda: _plot_gold_vs_kl(arms, colors),
            "Faint lines: each seed's training trajectory (checkpoints). Dots: final evaluation, mean over seeds "
            "with 95% CIs. "
            "Dashed: the frontier, the best gold reward reached for a given KL budget.",
        ),
        (
            "hacking",
            "Proxy vs gold reward over training",
            lambda: _plot_hacking(arms),
            "Mean over seeds. Proxy reward that keeps rising while gold flattens or falls is reward hacking (Gao et "
            "al. 2022).",
        ),
        (
            "diversity",
            "Diversity",
            lambda: _plot_diversity(arms),
            "Per-input: k samples for one prompt, averaged over prompts. Across-input: one sample per prompt. "
            "Bars: mean over seeds with 95% CIs (Kirk et al. 2023).",
        ),
        ("cost", "Cost by phase", lambda: _plot_cost(arms), "Wall seconds per phase, mean over seeds."),
        ("training", "Training curves", lambda: _plot_training(arms, colors), "Logged steps, mean over seeds."),
    ]
    return [
        {"id": plot_id, "title": title, "svg": draw(), "caption": caption} for plot_id, title, draw, caption in specs
    ]
