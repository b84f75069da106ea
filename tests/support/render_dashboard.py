#!/usr/bin/env python3
"""Renders the Stillpoint dashboard's panels to one PNG with matplotlib,
from the Prometheus range-query results the lab's monitoring test writes
(STILLPOINT_DASHBOARD_OUT=<json>): the picture in the README. Grafana
itself is not built here; each panel is drawn from exactly the queries of
deploy/helm/stillpoint/files/stillpoint-dashboard.json, over the test's
run, as Grafana's time series panels would draw them.

    python3 tests/support/render_dashboard.py <queries.json> <out.png>
"""
import json
import math
import os
import re
import sys
from collections import OrderedDict
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

SECONDS = ("window", "freeze", "waits", "since", "lease", "engine")


DASHBOARD = os.path.join(os.path.dirname(__file__), "../../deploy/helm/stillpoint/files/stillpoint-dashboard.json")


def legend_formats():
    """Each panel's targets' legendFormat, by title, in order."""
    out = {}
    for panel in json.load(open(DASHBOARD))["panels"]:
        out[panel["title"]] = [t.get("legendFormat", "") for t in panel.get("targets", [])]
    return out


def legend(metric, fmt):
    """Grafana's legendFormat: {{label}} replaced by the series' label."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)
    return " ".join(text.split()) or "value"


def main(src, out):
    queries = json.load(open(src))
    panels = OrderedDict()
    for q in queries:
        panels.setdefault(q["title"], []).append(q)
    n = len(panels)
    cols = 3
    rows = math.ceil(n / cols)
    plt.style.use("dark_background")
    fig, axes = plt.subplots(rows, cols, figsize=(18, 3.3 * rows), squeeze=False)
    fig.patch.set_facecolor("#111217")
    formats = legend_formats()
    for ax, (title, qs) in zip(axes.flat, panels.items()):
        ax.set_facecolor("#181b1f")
        ax.set_title(title, loc="left", fontsize=10, color="#d8d9da")
        for q, fmt in zip(qs, formats.get(title, [])):
            for series in q["result"]:
                xs, ys = [], []
                for t, v in series["values"]:
                    v = float(v)
                    if math.isnan(v) or math.isinf(v):
                        continue
                    xs.append(datetime.fromtimestamp(float(t), tz=timezone.utc))
                    ys.append(v)
                if xs:
                    style = "--" if q["expr"].startswith("max by (namespace, group) (stillpoint_freeze_budget") else "-"
                    ax.plot(xs, ys, style, linewidth=1.4, label=legend(series["metric"], fmt))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.tick_params(labelsize=7, colors="#8e8e8e")
        ax.grid(color="#2c3235", linewidth=0.6)
        if any(w in title.lower() for w in SECONDS):
            ax.set_ylabel("seconds", fontsize=7, color="#8e8e8e")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=6, loc="upper left", framealpha=0.3, ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#8e8e8e", transform=ax.transAxes)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Stillpoint — per group: backups, freeze window against budget, engines, snapshots, schedules, restores",
                 x=0.01, ha="left", fontsize=12, color="#d8d9da")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
