#!/usr/bin/env python3
"""Render the Grafana dashboard packaging/grafana/edgegate.json from recorded /metrics scrapes.

Grafana is not something this project can install, so this draws the dashboard itself: it
reads the dashboard JSON, evaluates each panel's PromQL over scrapes of a real gateway (made by
tools/dashboard/demo-run), and draws the panels at their gridPos in a PNG. It is a picture of
the dashboard's own queries on real data, not a screenshot of Grafana.

  render.py --scrapes FILE --out docs/dashboard.png   # draw
  render.py --check                                   # parse every query; check that every
                                                      # metric it names is exported by src/

Only the PromQL the dashboard uses is implemented: selectors with label matchers, rate() and
increase() over a range, sum/min/max [by (labels)], histogram_quantile(), and a comparison
with a number as a filter (`x < +Inf`). Grafana's $instance is "all" and $__rate_interval is
four scrape intervals, as Grafana makes it for a data source whose scrape interval is set.

The scrapes file: blocks of Prometheus text exposition, each after a line `# scrape <unix ts>`.
"""

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DASHBOARD = os.path.join(REPO, "packaging", "grafana", "edgegate.json")


# --- scrapes --------------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_value(text):
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


def load_scrapes(path):
    """[(t, {(name, labels): value})], labels a sorted tuple of (key, value)."""
    scrapes = []
    current = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("# scrape "):
                current = {}
                scrapes.append((float(line.split()[2]), current))
                continue
            if not line or line.startswith("#") or current is None:
                continue
            m = SAMPLE.match(line)
            if not m:
                continue
            labels = tuple(sorted(LABEL.findall(m.group(3) or "")))
            current[(m.group(1), labels)] = parse_value(m.group(4))
    return [(t, s) for t, s in scrapes if s]


# --- PromQL subset --------------------------------------------------------------------------

TOKEN = re.compile(r'\s*(?:(?P<num>[+-]?Inf|[+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?)'
                   r'|(?P<dur>\[[^\]]+\])|(?P<str>"(?:[^"\\]|\\.)*")'
                   r'|(?P<op>=~|!~|!=|<=|>=|[(){},=<>])|(?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*))')


def tokenize(expr):
    tokens, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise ValueError("cannot parse %r at %r" % (expr, expr[pos:]))
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class Parser:
    """expr := agg | call | selector, optionally followed by `< number` (or >, <=, >=)."""

    AGGS = ("sum", "min", "max", "avg")
    FUNCS = ("rate", "increase", "histogram_quantile")

    def __init__(self, expr):
        self.tokens = tokenize(expr)
        self.i = 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self, value=None):
        tok = self.peek()
        if tok[0] is None or (value is not None and tok[1] != value):
            raise ValueError("expected %r, found %r" % (value, tok[1]))
        self.i += 1
        return tok

    def parse(self):
        node = self.expr()
        if self.i != len(self.tokens):
            raise ValueError("trailing tokens: %r" % (self.tokens[self.i:],))
        return node

    def expr(self):
        node = self.term()
        kind, value = self.peek()
        if kind == "op" and value in ("<", ">", "<=", ">="):
            self.take()
            node = ("cmp", value, node, parse_value(self.take_number()))
        return node

    def take_number(self):
        kind, value = self.take()
        if kind != "num":
            raise ValueError("expected a number, found %r" % value)
        return value

    def labels(self):
        self.take("(")
        names = []
        while self.peek()[1] != ")":
            names.append(self.take()[1])
            if self.peek()[1] == ",":
                self.take(",")
        self.take(")")
        return tuple(names)

    def term(self):
        kind, value = self.take()
        if kind != "id":
            raise ValueError("unexpected %r" % value)
        if value in self.AGGS:
            by = None
            if self.peek()[1] == "by":
                self.take()
                by = self.labels()
            self.take("(")
            inner = self.expr()
            self.take(")")
            if self.peek()[1] == "by":
                self.take()
                by = self.labels()
            return ("agg", value, by, inner)
        if value in self.FUNCS:
            self.take("(")
            if value == "histogram_quantile":
                q = float(self.take_number())
                self.take(",")
                inner = self.expr()
                self.take(")")
                return ("quantile", q, inner)
            sel = self.term()
            if sel[0] != "sel":
                raise ValueError("%s() takes a selector" % value)
            kind, dur = self.take()
            if kind != "dur":
                raise ValueError("%s() needs a range" % value)
            self.take(")")
            return ("range", value, sel, dur[1:-1])
        matchers = []
        if self.peek()[1] == "{":
            self.take("{")
            while self.peek()[1] != "}":
                label = self.take()[1]
                op = self.take()[1]
                text = json.loads(self.take()[1])
                matchers.append((label, op, text))
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("}")
        return ("sel", value, tuple(matchers))


def metric_names(node):
    if node[0] == "sel":
        return {node[1]}
    if node[0] == "agg":
        return metric_names(node[3])
    if node[0] == "quantile":
        return metric_names(node[2])
    if node[0] == "range":
        return metric_names(node[2])
    if node[0] == "cmp":
        return metric_names(node[2])
    raise ValueError(node)


def duration_seconds(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not m:
        raise ValueError("duration %r" % text)
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


class Evaluator:
    """Evaluates a parsed query at every scrape time; a result is {labels: [value or None]}."""

    def __init__(self, scrapes, variables):
        self.scrapes = scrapes
        self.times = [t for t, _ in scrapes]
        self.variables = variables
        # name -> labels -> [value or None per scrape]
        self.series = defaultdict(lambda: defaultdict(lambda: [None] * len(scrapes)))
        for i, (_, samples) in enumerate(scrapes):
            for (name, labels), value in samples.items():
                self.series[name][labels][i] = value

    def substitute(self, expr):
        for name, value in self.variables.items():
            expr = expr.replace("$" + name, value)
        return expr

    def query(self, expr):
        return self.eval(Parser(self.substitute(expr)).parse())

    def match(self, labels, matchers):
        d = dict(labels)
        for label, op, text in matchers:
            v = d.get(label, "")
            ok = {"=": v == text, "!=": v != text,
                  "=~": re.fullmatch(text, v) is not None,
                  "!~": re.fullmatch(text, v) is None}[op]
            if not ok:
                return False
        return True

    def eval(self, node):
        kind = node[0]
        if kind == "sel":
            return {labels: list(vals) for labels, vals in self.series[node[1]].items()
                    if self.match(labels, node[2])}
        if kind == "range":
            _, func, sel, dur = node
            window = duration_seconds(dur)
            out = {}
            for labels, vals in self.eval(sel).items():
                drop = tuple((k, v) for k, v in labels if k != "__name__")
                out[drop] = [self.increase(vals, i, window, func == "rate")
                             for i in range(len(vals))]
            return out
        if kind == "agg":
            _, op, by, inner = node
            groups = defaultdict(list)
            for labels, vals in self.eval(inner).items():
                key = tuple((k, v) for k, v in labels if by is not None and k in by)
                groups[key].append(vals)
            fn = {"sum": sum, "min": min, "max": max,
                  "avg": lambda xs: sum(xs) / len(xs)}[op]
            out = {}
            for key, members in groups.items():
                col = []
                for i in range(len(self.times)):
                    xs = [m[i] for m in members if m[i] is not None and not math.isnan(m[i])]
                    col.append(fn(xs) if xs else None)
                out[key] = col
            return out
        if kind == "cmp":
            _, op, inner, bound = node
            test = {"<": lambda v: v < bound, ">": lambda v: v > bound,
                    "<=": lambda v: v <= bound, ">=": lambda v: v >= bound}[op]
            return {labels: [v if v is not None and test(v) else None for v in vals]
                    for labels, vals in self.eval(inner).items()}
        if kind == "quantile":
            _, q, inner = node
            groups = defaultdict(dict)
            for labels, vals in self.eval(inner).items():
                d = dict(labels)
                le = parse_value(d.pop("le"))
                groups[tuple(sorted(d.items()))][le] = vals
            return {key: [self.quantile(q, buckets, i) for i in range(len(self.times))]
                    for key, buckets in groups.items()}
        raise ValueError(node)

    def increase(self, vals, i, window, per_second):
        """Counter increase over (t - window, t], reset-aware; per second for rate()."""
        t = self.times[i]
        points = [(self.times[j], vals[j]) for j in range(i + 1)
                  if vals[j] is not None and self.times[j] > t - window]
        if len(points) < 2:
            return None
        total = 0.0
        for (_, a), (_, b) in zip(points, points[1:]):
            total += b - a if b >= a else b
        span = points[-1][0] - points[0][0]
        if per_second:
            return total / span if span > 0 else None
        # increase() extrapolates to the whole window, as Prometheus does.
        return total * window / span if span > 0 else None

    @staticmethod
    def quantile(q, buckets, i):
        """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
        points = sorted((le, vals[i]) for le, vals in buckets.items() if vals[i] is not None)
        if not points or points[-1][0] != math.inf:
            return None
        total = points[-1][1]
        if total <= 0:
            return None
        rank = q * total
        prev_le, prev_count = 0.0, 0.0
        for le, count in points:
            if count >= rank:
                if le == math.inf:
                    return prev_le
                if count == prev_count:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
            prev_le, prev_count = le, count
        return None


def legend(fmt, labels, expr):
    if not fmt:
        return ", ".join("%s=%s" % kv for kv in labels) or expr
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: dict(labels).get(m.group(1), ""), fmt)


# --- units ----------------------------------------------------------------------------------

def fmt_value(v, unit, decimals=None):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "s":
        if v == 0:
            return "0 s"
        if v < 0.001:
            return "%.0f µs" % (v * 1e6)
        if v < 1:
            return "%.3g ms" % (v * 1000)
        if v < 60:
            return "%.3g s" % v
        if v < 3600:
            return "%.3g min" % (v / 60)
        if v < 86400:
            return "%.3g hour" % (v / 3600)
        return "%.3g day" % (v / 86400)
    if unit == "bytes":
        for i, name in enumerate(["B", "KiB", "MiB", "GiB", "TiB"]):
            if abs(v) < 1024 ** (i + 1) or name == "TiB":
                return ("%.0f %s" if i == 0 else "%.3g %s") % (v / 1024 ** i, name)
    suffix = unit[len("suffix:"):] if unit and unit.startswith("suffix:") else ""
    if decimals is not None:
        text = "%.*f" % (decimals, v)
    elif abs(v) >= 1e6:
        text = "%.3g Mil" % (v / 1e6)
    elif abs(v) >= 1e3:
        text = "%.3g K" % (v / 1e3)
    elif v == int(v):
        text = "%d" % v
    else:
        text = "%.3g" % v
    return text + suffix


# --- drawing --------------------------------------------------------------------------------

BG, PANEL, BORDER, TEXT, DIM = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a"]
NAMED = {"green": "#73bf69", "red": "#f2495c", "orange": "#ff9830", "yellow": "#fade2a",
         "blue": "#5794f2"}


def color(name):
    return NAMED.get(name, name)


def threshold_color(steps, v):
    c = steps[0]["color"]
    for step in steps[1:]:
        if v is not None and step["value"] is not None and v >= step["value"]:
            c = step["color"]
    return color(c)


def mapped(defaults, v):
    for mapping in defaults.get("mappings", []):
        if mapping.get("type") == "value" and v is not None:
            key = "%g" % v
            if key in mapping["options"]:
                return mapping["options"][key]
    return None


def render(dashboard, evaluator, out, title_note):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from datetime import datetime, timezone

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    col_px, row_px, header_px, dpi = 60, 24, 46, 100
    width, height = 24 * col_px, rows * row_px + header_px
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=BG)
    plt.rcParams.update({"font.size": 8, "font.family": "DejaVu Sans", "text.color": TEXT,
                         "axes.labelcolor": DIM, "xtick.color": DIM, "ytick.color": DIM})
    fig.text(8 / width, 1 - 18 / height, dashboard["title"], fontsize=13, color=TEXT,
             va="center", weight="bold")
    fig.text(1 - 8 / width, 1 - 18 / height, title_note, fontsize=8, color=DIM,
             va="center", ha="right")
    times = [datetime.fromtimestamp(t, tz=timezone.utc) for t in evaluator.times]
    gap = 3 / width

    def box(gp):
        x0 = gp["x"] * col_px / width + gap
        x1 = (gp["x"] + gp["w"]) * col_px / width - gap
        top = 1 - (header_px + gp["y"] * row_px) / height - gap
        bottom = 1 - (header_px + (gp["y"] + gp["h"]) * row_px) / height + gap
        return x0, bottom, x1 - x0, top - bottom

    for p in panels:
        x, y, w, h = box(p["gridPos"])
        if p["type"] == "row":
            fig.text(x, y + h / 2, p["title"], fontsize=10, color=TEXT, va="center",
                     weight="bold")
            continue
        fig.add_artist(plt.Rectangle((x, y), w, h, transform=fig.transFigure,
                                     facecolor=PANEL, edgecolor=BORDER, linewidth=0.8,
                                     zorder=-10))
        fig.text(x + 6 / width, y + h - 11 / height, p["title"], fontsize=8.5, color=TEXT,
                 va="center", weight="bold")
        defaults = p["fieldConfig"]["defaults"]
        unit = defaults.get("unit", "short")
        results = []
        for t in p["targets"]:
            for labels, vals in sorted(evaluator.query(t["expr"]).items()):
                results.append((legend(t.get("legendFormat"), labels, t["expr"]), vals))
        if p["type"] == "stat":
            draw_stat(fig, plt, p, defaults, unit, results, times, (x, y, w, h), width, height)
        elif p["type"] == "timeseries":
            draw_series(fig, plt, mdates, p, defaults, unit, results, times, (x, y, w, h),
                        width, height)
        elif p["type"] == "state-timeline":
            draw_states(fig, plt, mdates, defaults, results, times, (x, y, w, h), width, height)
        else:
            raise ValueError("panel type %s is not drawn" % p["type"])

    fig.savefig(out, dpi=dpi, facecolor=BG)
    plt.close(fig)
    shrink(out)


def draw_stat(fig, plt, p, defaults, unit, results, times, rect, width, height):
    x, y, w, h = rect
    vals = results[0][1] if results else []
    last = next((v for v in reversed(vals) if v is not None), None)
    steps = defaults["thresholds"]["steps"]
    m = mapped(defaults, last)
    if last is None:
        text, c = defaults.get("noValue", "No data"), DIM
    elif m:
        text, c = m["text"], color(m.get("color", TEXT))
    else:
        text = fmt_value(last, unit, defaults.get("decimals"))
        c = threshold_color(steps, last)
    if p["options"].get("graphMode") == "area" and any(v is not None for v in vals):
        ax = fig.add_axes([x + 1 / width, y + 1 / height, w - 2 / width, h * 0.45])
        ax.set_axis_off()
        xs = [t for t, v in zip(times, vals) if v is not None]
        ys = [v for v in vals if v is not None]
        ax.fill_between(xs, ys, color=c, alpha=0.18, linewidth=0)
        ax.plot(xs, ys, color=c, linewidth=0.8, alpha=0.6)
        ax.set_xlim(times[0], times[-1])
        ax.set_ylim(bottom=min(0, min(ys)))
    fig.text(x + w / 2, y + h * 0.45, text, fontsize=17 if len(text) < 12 else 12, color=c,
             ha="center", va="center", weight="bold")


def style_axes(ax, mdates):
    ax.set_facecolor(PANEL)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_color(BORDER)
    ax.grid(True, color=BORDER, linewidth=0.5)
    ax.tick_params(length=0, labelsize=7)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    ax.xaxis.set_major_locator(mdates.MinuteLocator(interval=2))


def draw_series(fig, plt, mdates, p, defaults, unit, results, times, rect, width, height):
    x, y, w, h = rect
    ax = fig.add_axes([x + 66 / width, y + 34 / height, w - 74 / width, h - 56 / height])
    style_axes(ax, mdates)
    fill = defaults["custom"].get("fillOpacity", 0) / 100
    stack = defaults["custom"].get("stacking", {}).get("mode") == "normal"
    base = [0.0] * len(times)
    handles = []
    for i, (name, vals) in enumerate(results):
        c = PALETTE[i % len(PALETTE)]
        if stack:
            ys = [b + v if v is not None else None for b, v in zip(base, vals)]
            lows = list(base)
            base = [y if y is not None else b for b, y in zip(base, ys)]
        else:
            ys, lows = vals, [0.0] * len(vals)
        ys_plot = [v if v is not None else math.nan for v in ys]
        (line,) = ax.plot(times, ys_plot, color=c, linewidth=1.1, label=name)
        handles.append(line)
        if fill:
            ax.fill_between(times, lows, ys_plot, color=c, alpha=fill, linewidth=0)
    ax.set_xlim(times[0], times[-1])
    finite = [v for _, vals in results for v in vals if v is not None and math.isfinite(v)]
    top = max(finite) if finite else 1
    if stack:
        top = max([top] + [b for b in base])
    ax.set_ylim(0, top * 1.08 if top > 0 else 1)
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: fmt_value(v, unit)))
    ax.yaxis.set_major_locator(plt.MaxNLocator(4))
    if not results:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", color=DIM)
    elif handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(-0.02, -0.13),
                  ncol=min(len(handles), 4), frameon=False, fontsize=7, handlelength=1.2,
                  columnspacing=1.0, labelcolor=TEXT)


def draw_states(fig, plt, mdates, defaults, results, times, rect, width, height):
    x, y, w, h = rect
    ax = fig.add_axes([x + 10 / width, y + 30 / height, w - 20 / width, h - 50 / height])
    style_axes(ax, mdates)
    ax.grid(False)
    ax.set_yticks([])
    n = max(len(results), 1)
    for row, (name, vals) in enumerate(results):
        start = 0
        for i in range(1, len(vals) + 1):
            if i == len(vals) or vals[i] != vals[start]:
                m = mapped(defaults, vals[start])
                if m:
                    end = times[i] if i < len(vals) else times[-1]
                    ax.axvspan(times[start], end, ymin=row / n + 0.1 / n,
                               ymax=(row + 1) / n - 0.1 / n, color=color(m["color"]),
                               alpha=0.8, linewidth=0)
                    mid = times[start] + (end - times[start]) / 2
                    ax.text(mid, (row + 0.5) / n, m["text"], ha="center", va="center",
                            color="#000000", fontsize=8, weight="bold",
                            transform=ax.get_xaxis_transform())
                start = i
    ax.set_xlim(times[0], times[-1])


def shrink(path):
    """Quantize to a palette: the picture stays sharp and the file small."""
    try:
        from PIL import Image
    except ImportError:
        return
    img = Image.open(path).convert("RGB")
    img.quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)


# --- check ----------------------------------------------------------------------------------

def exported_names():
    """Metric names that appear as string literals in src/ (the recorder adds histogram suffixes)."""
    names = set()
    for base, _, files in os.walk(os.path.join(REPO, "src")):
        for f in files:
            if f.endswith(".rs"):
                with open(os.path.join(base, f), encoding="utf-8") as fh:
                    names.update(re.findall(r'"(edgegate_[a-z0-9_]+)"', fh.read()))
    return names


def check(dashboard):
    names = exported_names()
    problems = []
    variables = {"instance": ".*", "__rate_interval": "1m"}
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            try:
                node = Parser(Evaluator([], variables).substitute(expr)).parse()
            except ValueError as e:
                problems.append("panel %r: %s" % (p["title"], e))
                continue
            for name in metric_names(node):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if name not in names and base not in names:
                    problems.append("panel %r: %s is not exported by src/" % (p["title"], name))
            if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                problems.append("panel %r: datasource is not ${DS_PROMETHEUS}" % p["title"])
    if not any(i.get("name") == "DS_PROMETHEUS" for i in dashboard.get("__inputs", [])):
        problems.append("no DS_PROMETHEUS input: the dashboard would not import cleanly")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dashboard", default=DASHBOARD)
    ap.add_argument("--scrapes", help="scrapes file written by tools/dashboard/demo-run")
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "dashboard.png"))
    ap.add_argument("--check", action="store_true", help="check the queries; draw nothing")
    ap.add_argument("--note", default="rendered by tools/dashboard/render.py from a real run, "
                                      "not by Grafana")
    args = ap.parse_args()
    with open(args.dashboard, encoding="utf-8") as f:
        dashboard = json.load(f)
    if args.check:
        problems = check(dashboard)
        for problem in problems:
            print("render.py: " + problem, file=sys.stderr)
        n = sum(len(p.get("targets", [])) for p in dashboard["panels"])
        print("render.py: %d queries checked, %d problems" % (n, len(problems)), file=sys.stderr)
        return 1 if problems else 0
    if not args.scrapes:
        ap.error("--scrapes is required to draw")
    scrapes = load_scrapes(args.scrapes)
    if len(scrapes) < 3:
        ap.error("too few scrapes in %s" % args.scrapes)
    steps = sorted(b[0] - a[0] for a, b in zip(scrapes, scrapes[1:]))
    interval = steps[len(steps) // 2]
    variables = {"instance": ".*", "__rate_interval": "%gs" % round(4 * interval, 1)}
    render(dashboard, Evaluator(scrapes, variables), args.out, args.note)
    print("render.py: %d scrapes, every %.1fs, $__rate_interval=%s -> %s (%d bytes)"
          % (len(scrapes), interval, variables["__rate_interval"], args.out,
             os.path.getsize(args.out)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
