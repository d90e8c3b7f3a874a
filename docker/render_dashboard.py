"""Draw the Grafana dashboard (docker/grafana/dashboards/tptt.json) with matplotlib from a real Prometheus.

Where Grafana cannot run, this still shows what the dashboard shows: every panel's title, grid position, unit,
queries and legends come from the dashboard JSON, and every point from Prometheus's /api/v1/query_range.
`--drive` first sends real traffic to a running tptt-serve (concurrent streamed multi-turn chats, half of them
in named sessions) so that there is something to look at. docs/img/dashboard.png was made this way
(docs/deployment.md has the commands).

Boundaries: speaks HTTP to Prometheus and to the server (openai client); imports nothing of this project.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.dates import DateFormatter
from matplotlib.ticker import FuncFormatter

DASHBOARD = Path(__file__).parent / "grafana" / "dashboards" / "tptt.json"
COLORS = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#B877D9", "#5794F2", "#FADE2A"]
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181B1F", "#CCCCDC", "#2C3235"
TOPICS = ["the sea", "a lighthouse keeper", "how bread rises", "the moon", "a city at night", "trains",
          "why the sky is blue", "a chess game", "autumn", "a robot learning to paint"]
FOLLOW_UPS = ["Tell me more.", "Now make it shorter.", "Add a surprising detail.", "Explain it to a child.",
              "What happens next?", "Give it a title."]


# ---------------------------------------------------------------- traffic

def chat_worker(base_url: str, api_key: str, deadline: float, named: bool, seed: int) -> None:
    """Multi-turn conversations until `deadline`: resending the history, or (named) only the new message."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=2, timeout=600)
    model = client.models.list().data[0].id
    rng = random.Random(seed)
    conversation = 0
    while time.monotonic() < deadline:
        conversation += 1
        session = {"session_id": f"render-{seed}-{conversation}"} if named else {}
        history = []
        for turn in range(rng.randint(3, 6)):
            if time.monotonic() >= deadline:
                return
            text = f"Write a short story about {rng.choice(TOPICS)}." if turn == 0 else rng.choice(FOLLOW_UPS)
            message = {"role": "user", "content": text}
            stream = client.chat.completions.create(
                model=model, messages=[message] if named else history + [message], stream=True,
                max_tokens=rng.randint(32, 128), temperature=0.8, extra_body=session)
            reply = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            history += [message, {"role": "assistant", "content": reply}]


def drive(base_url: str, api_key: str, minutes: float, workers: int) -> None:
    deadline = time.monotonic() + minutes * 60
    threads = [threading.Thread(target=chat_worker, args=(base_url, api_key, deadline, i % 2 == 1, i))
               for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# ---------------------------------------------------------------- data

def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """Prometheus's matrix for `expr`: [{"metric": labels, "values": [[t, "v"], ...]}, ...]."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as response:
        answer = json.load(response)
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def legend(template: str, labels: dict) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or str(labels)


def panel_series(panel: dict, prometheus: str, start: float, end: float, step: float, rate_interval: str):
    """(legend, times, values) of every series of every query of `panel`."""
    series = []
    for target in panel["targets"]:
        expr = target["expr"].replace("$__rate_interval", rate_interval)
        for result in query_range(prometheus, expr, start, end, step):
            points = [(t, float(v)) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
            if points:
                times, values = zip(*points)
                series.append((legend(target.get("legendFormat", ""), result["metric"]), times, values))
    return series


# ---------------------------------------------------------------- drawing

def unit_formatter(unit: str) -> FuncFormatter:
    """Tick labels in the panel's Grafana unit (bytes, s, percentunit, reqps, short)."""
    def scaled(value, steps, names):
        for step, name in zip(steps, names):
            if abs(value) < step * 1024 or name == names[-1]:
                return f"{value / step:.3g} {name}"

    def fmt(value, _):
        if unit == "bytes":
            return scaled(value, [1, 2 ** 10, 2 ** 20, 2 ** 30], ["B", "KiB", "MiB", "GiB"])
        if unit == "s":
            return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
        if unit == "percentunit":
            return f"{value * 100:.0f}%"
        suffix = " req/s" if unit == "reqps" else ""
        return f"{value:.3g}{suffix}"
    return FuncFormatter(fmt)


def draw_panel(ax, panel: dict, series) -> None:
    ax.set_facecolor(PANEL)
    ax.set_title(panel["title"], color=TEXT, loc="left", fontsize=11, fontweight="bold")
    defaults = panel["fieldConfig"]["defaults"]
    for i, (name, times, values) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        dates = [datetime.fromtimestamp(t) for t in times]
        ax.plot(dates, values, color=color, linewidth=1.6, label=name)
        ax.fill_between(dates, values, color=color, alpha=0.08)
    if not series:
        ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(bottom=defaults.get("min"))
    ax.set_ylim(top=defaults.get("max", ax.get_ylim()[1] * 1.2))  # headroom for the legend
    ax.yaxis.set_major_formatter(unit_formatter(defaults["unit"]))
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M"))
    ax.tick_params(colors=TEXT, labelsize=8)
    ax.grid(color=GRID, linewidth=0.6)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    if series:
        ax.legend(loc="upper left", fontsize=8, frameon=False, labelcolor=TEXT, ncol=min(4, len(series)))


def render(dashboard: dict, data: list, out: Path, subtitle: str) -> None:
    """One axes per panel, placed by its gridPos on Grafana's 24-column grid."""
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(20, rows * 0.42 + 0.9), facecolor=BACKGROUND)
    top = 1 - 0.9 / fig.get_figheight()
    fig.text(0.01, 1 - 0.3 / fig.get_figheight(), dashboard["title"], color=TEXT, fontsize=15, fontweight="bold",
             va="center")
    fig.text(0.99, 1 - 0.3 / fig.get_figheight(), subtitle, color="#8E8E8E", fontsize=9, ha="right", va="center")
    for panel, series in zip(dashboard["panels"], data):
        g = panel["gridPos"]
        left, width = g["x"] / 24 + 0.035, g["w"] / 24 - 0.045
        height = g["h"] / rows * top - 0.055
        bottom = top - (g["y"] + g["h"]) / rows * top + 0.03
        draw_panel(fig.add_axes((left, bottom, width, height)), panel, series)
    fig.savefig(out, dpi=110, facecolor=BACKGROUND)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"), help="PNG to write")
    parser.add_argument("--minutes", type=float, default=10, help="length of the time range drawn")
    parser.add_argument("--end", type=float, help="end of the range drawn, Unix seconds (default: now)")
    parser.add_argument("--rate-interval", default="30s", help="what $__rate_interval stands for")
    parser.add_argument("--drive", metavar="URL", help="first send traffic to this tptt-serve base URL")
    parser.add_argument("--drive-minutes", type=float, default=5)
    parser.add_argument("--workers", type=int, default=4, help="concurrent conversations while driving")
    parser.add_argument("--api-key", default="unused")
    args = parser.parse_args(argv)
    if args.drive:
        drive(args.drive, args.api_key, args.drive_minutes, args.workers)
        time.sleep(15)  # a few more scrapes after the last request
    dashboard = json.loads(DASHBOARD.read_text())
    end = args.end or time.time()
    start = end - args.minutes * 60
    step = max(5.0, (end - start) / 400)
    data = [panel_series(p, args.prometheus, start, end, step, args.rate_interval) for p in dashboard["panels"]]
    subtitle = (f"matplotlib rendering of the dashboard's queries on real Prometheus data, "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(start))} + {args.minutes:g} min")
    render(dashboard, data, args.out, subtitle)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
