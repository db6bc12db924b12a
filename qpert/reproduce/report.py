"""``reproduce/report.html``: measured beside published, per run, in the page layout ``qpert demo`` uses."""

from __future__ import annotations

import html
import json

from .. import report
from .runner import Reproduction


def render(reproduction: Reproduction) -> str:
    spec, settings = reproduction.protocol, reproduction.settings
    versions = ", ".join(f"{k} {v}" for k, v in settings["versions"].items())
    where = settings["gpu"] or settings["device"]
    intro = (
        f"{html.escape(spec.description)}.<br>Model <code>{html.escape(reproduction.model)}</code> in float32 on "
        f"{html.escape(where)} ({settings['world_size']} process(es)); data root "
        f"<code>{html.escape(settings['data_root'])}</code>; finished {settings['finished']} after "
        f"{settings['seconds']} s; {html.escape(versions)}."
    )
    note = html.escape(reproduction.published.note)
    if not reproduction.model_is_published:
        note = (
            f"<b>The model is {html.escape(reproduction.model)}, not the protocol's {html.escape(spec.model)}: "
            "its numbers cannot be compared with the published ones.</b> The report shows that the pipeline "
            "ran end to end. " + note
        )
    sections = [("Measured beside published", _comparison(reproduction))]
    for done in reproduction.runs:
        result, run = done.test, done.run
        s = result.settings
        how = "chosen on val by T2I mR@1" if done.tuning is not None else "fixed by the protocol"
        rerank = f"ITC + ITM re-ranking of the top {s['k']}" if s["itm"] else "ITC only"
        facts = (
            f"<p>{html.escape(run.description)}; compat {run.compat}; {s['num_images']} test images, "
            f"{s['num_texts']} texts; boxes {html.escape(str(s['boxes_summary']))}; {rerank}. Q-Pert setting ({how}): "
            f"<code>{html.escape(json.dumps(done.config.to_dict()))}</code></p>"
        )
        chart = report.bin_chart({n: result.metrics[n] for n in ("baseline", "qpert")})
        sections.append((f"Run {run.name}: all metrics (test)", facts + report.preformatted(result.table()) + chart))
        if done.tuning is not None:
            header = ["setting (val)", "T2I R@1", "T2I mR@1", "T2I small R@1"]
            sections.append(
                (
                    f"Run {run.name}: tuning on val (best 10 of {len(done.tuning.metrics) - 1})",
                    report.table(header, done.tuning_rows()),
                )
            )
    source = reproduction.published
    sections.append(
        (
            "Sources",
            f'<p>{html.escape(source.source)} (<a href="{html.escape(source.url)}">{html.escape(source.url)}</a>).'
            " The numbers are package data: <code>qpert/reproduce/published.json</code>.</p>",
        )
    )
    return report.page(f"qpert reproduce {spec.name}", intro, sections, note)


def _comparison(reproduction: Reproduction) -> str:
    rows = [
        (r["run"], r["method"], r["direction"].upper(), r["metric"], r["measured"], r["published"], r["difference"])
        for r in sorted(reproduction.comparison(), key=lambda r: r["published"] is None)
    ]
    header = ["run", "method", "direction", "metric", "measured", "published", "measured − published"]
    return report.table(header, rows) + "<p>–: no published number for this cell.</p>"
