"""Renders an audit's findings as one self-contained HTML page.

`render(facts, gallery)` is a pure function of its inputs: images are inlined
as PNG data URIs, charts are inline SVG, styling is one <style> block, and
there is no script and no external resource, so the file opens from disk in
any browser. Every string that comes from a model or a config is HTML-escaped
wherever it lands (text, attributes, SVG <title>s); numbers that are None or
not finite print as "n/a" and never reach SVG coordinates.

Sections, in order: header (headline figures, wall time per stage), discovered
failure types (ranked table and per-model share chart), failure types found
without labels (when given: names, who named them, sizes, example images), planted gaps, the
exemplar gallery, benchmark accuracy before / after rectification, the
auditor's learning curve, notes. See `render` for the input schema.
"""

from __future__ import annotations

import base64
import functools
import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from auditdm_jax.data.records import encode_png
from auditdm_jax.utils.fileio import atomic_write_text

NA = "n/a"
# One colour per model (cycled), distinguishable and colour-blind safe.
PALETTE = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377",
           "#bbbbbb", "#000000")
SERIES = (("reward", "#4477aa"), ("success_rate", "#ee6677"))
SCALE = 3  # the 48x48 scene images are shown at 144x144

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;
 max-width:1180px;padding:0 16px 48px;color:#1d1d1f;background:#fff}
h1{margin:24px 0 4px}h2{margin:36px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
.muted{color:#666}.na{color:#999;font-style:italic}
.stats{display:flex;gap:16px;flex-wrap:wrap;margin:14px 0}
.stat{border:1px solid #ddd;border-radius:8px;padding:10px 16px;min-width:150px}
.stat b{display:block;font-size:28px}
table{border-collapse:collapse;margin:8px 0}
th,td{border-bottom:1px solid #e5e5e5;padding:3px 10px;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.gapped td{background:#fff4e0}
.badge{font-size:11px;border-radius:4px;padding:0 5px;margin-left:6px;background:#f0a030;color:#fff}
.found{color:#1a7f37;font-weight:600}.missed{color:#b42318;font-weight:600}
.up{color:#1a7f37}.down{color:#b42318}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 12px;width:340px}
.card h3{margin:0 0 6px;font-size:14px}
.card figure{display:inline-block;margin:0 8px 6px 0;text-align:center}
.card figcaption{font-size:11px;color:#666}
img.px{image-rendering:pixelated;image-rendering:crisp-edges;border:1px solid #ccc}
.card dl{margin:4px 0;display:grid;grid-template-columns:max-content 1fr;gap:2px 8px}
.card dt{color:#666}.card dd{margin:0;white-space:pre-wrap;word-break:break-word}
.differs{color:#b42318;font-weight:600}
.flex{display:flex;flex-wrap:wrap;gap:24px}
.descr{background:#888}.validated{background:#1a7f37}
.thumbs figure{display:inline-block;margin:0 6px 4px 0;text-align:center;max-width:150px}
.thumbs figcaption{font-size:11px;color:#666;word-break:break-word}
svg text{font:11px system-ui,sans-serif;fill:#333}
svg .grid{stroke:#e5e5e5}svg .axis{stroke:#888}
"""


def render(facts: Mapping | None, gallery: Sequence[Mapping] = ()) -> str:
  """Returns the report as a complete HTML document.

  `facts` (every key optional; missing or None renders as "not available"):
    title, workdir: str
    planted_gap_recall, exemplar_precision: float
    label_precision, search_trained, search_warm_start (per probe),
      search_per_seed_trained, search_per_seed_warm_start (the paper's per-seed
      count), top_question_share: float (shown when present)
    planted_gaps: {MODEL: {SPEC: {"found": bool, "rank": int, "type": str}}}
    failure_types: [{"name", "count", "share": {MODEL: f}, "rate": {MODEL: f}}],
      ranked best first
    accuracy_before, accuracy_after: {MODEL: {SKILL: f, ..., "overall": f}}
    gapped_skills: {MODEL: [SKILL, ...]}
    learning_curve: [{"step", "reward", "success_rate"}]
    wall_s: {STAGE: seconds}
    notes: [str]
    unlabelled (optional; the section is left out without it): the failure
      types found without skill labels (`mine.clusters`): {"failure_types":
      [{"name", "named_by", "descriptive", "size", "count", "probes",
      "rate": {MODEL: f}, "candidates": [{"name", "source", "member_rate",
      "nonmember_rate", "kept"}], "gallery": [{"id", "image" (uint8
      [H, W, 3]), "question", "pseudo_label"}]}], "planted_gap_recall",
      "labelled_recall", "clusters", "check": {"ari_skill_answer", ...}}
  `gallery`: exemplars {"id", "seed_image", "image" (uint8 [H, W, 3]), "route",
    "auditor_text", "question", "pseudo_label", "truth", "category",
    "answers": {MODEL: str}, optional "failed": [MODEL] (which answers to mark
    as differing from the pseudo-label; by default a plain text comparison)}.

  Raises ValueError on malformed input (a bad image names the gallery item and
  field; a bad failure-type entry names its index).
  """
  facts = facts or {}
  title = facts.get("title") or "AuditDM report"
  body = [
      _header(facts, title),
      _failure_types(facts),
      _unlabelled(facts),
      _planted_gaps(facts),
      _gallery(gallery or ()),
      _accuracy(facts),
      _learning_curve(facts),
      _notes(facts),
  ]
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
          f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
          + "\n".join(body)
          + "\n<footer class=\"muted\"><p>Generated by auditdm_jax.report.</p></footer>"
          "\n</body>\n</html>\n")


def write(path: str | os.PathLike, facts: Mapping | None,
          gallery: Sequence[Mapping] = ()) -> None:
  """Renders the report and atomically writes it to `path`."""
  atomic_write_text(path, render(facts, gallery))


# ---------------------------------------------------------------- helpers

def _e(x) -> str:
  return html.escape(str(x), quote=True)


def _real(x) -> float | None:
  """`x` as a finite float, or None (None, NaN, inf, non-numbers)."""
  if x is None or isinstance(x, (str, bytes)):
    return None
  try:
    v = float(x)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def _pct(x) -> str:
  v = _real(x)
  return NA if v is None else f"{100 * v:.1f}%"


def _int(x) -> str:
  v = _real(x)
  return NA if v is None else str(int(v))


def _duration(x) -> str:
  v = _real(x)
  if v is None:
    return NA
  if v < 60:
    return f"{v:.1f} s"
  if v < 3600:
    return f"{int(v // 60)} min {int(v % 60):02d} s"
  return f"{int(v // 3600)} h {int(v % 3600 // 60):02d} min"


def _mapping(obj: Mapping, key: str, where: str = "facts") -> Mapping:
  value = obj.get(key)
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise TypeError(f"{where}[{key!r}] must be a mapping, got {type(value).__name__}")
  return value


def _sequence(obj: Mapping, key: str) -> Sequence:
  value = obj.get(key)
  if value is None:
    return ()
  if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
    raise TypeError(f"facts[{key!r}] must be a list, got {type(value).__name__}")
  return value


def _union(dicts: Iterable[Mapping]) -> list:
  """Keys of all `dicts`, in order of first appearance."""
  return list(dict.fromkeys(k for d in dicts for k in d))


def _na(text: str = "not available") -> str:
  return f"<p class=\"na\">{_e(text)}</p>"


def _section(ident: str, heading: str, content: str) -> str:
  return f"<section id=\"{ident}\">\n<h2>{_e(heading)}</h2>\n{content}\n</section>"


def _fmt(v: float) -> str:
  """An SVG coordinate (callers pass finite values only)."""
  return f"{v:.1f}"


def _clip(text: str, n: int) -> str:
  return text if len(text) <= n else text[:n - 1] + "\u2026"


def _text(item: Mapping, key: str) -> str:
  value = item.get(key)
  return NA if value is None else _e(value)


def _same_answer(a, b) -> bool:
  norm = lambda s: " ".join(str(s).lower().strip(" .!?").split())
  return norm(a) == norm(b)


# --------------------------------------------------------------- sections

def _header(facts: Mapping, title: str) -> str:
  stats = "".join(
      f"<div class=\"stat\">{_e(label)}<b>{_pct(facts.get(key))}</b></div>"
      for label, key in (("search success per probe, trained auditor", "search_trained"),
                         ("search success per probe, warm start", "search_warm_start"),
                         ("search success per seed, trained auditor",
                          "search_per_seed_trained"),
                         ("search success per seed, warm start",
                          "search_per_seed_warm_start"),
                         ("top question's share of the mined probes",
                          "top_question_share"),
                         ("planted-gap recall", "planted_gap_recall"),
                         ("exemplar precision", "exemplar_precision"),
                         ("pseudo-label precision", "label_precision"))
      if key in facts or key in ("planted_gap_recall", "exemplar_precision"))
  wall = _mapping(facts, "wall_s")
  if wall:
    rows = "".join(f"<tr><td>{_e(stage)}</td><td class=\"num\">{_duration(s)}</td></tr>"
                   for stage, s in wall.items())
    total = [v for v in map(_real, wall.values()) if v is not None]
    rows += f"<tr><th>total</th><th class=\"num\">{_duration(sum(total))}</th></tr>"
    wall_html = ("<table id=\"wall-time\"><thead><tr><th>stage</th>"
                 f"<th class=\"num\">wall time</th></tr></thead><tbody>{rows}</tbody></table>")
  else:
    wall_html = _na()
  workdir = facts.get("workdir")
  where = f"<p class=\"muted\">workdir: <code>{_e(workdir)}</code></p>" if workdir else ""
  return (f"<header id=\"summary\">\n<h1>{_e(title)}</h1>\n{where}\n"
          f"<div class=\"stats\">{stats}</div>\n<h3>Wall time per stage</h3>\n{wall_html}\n"
          "</header>")


def _failure_types(facts: Mapping) -> str:
  types = _sequence(facts, "failure_types")
  for i, t in enumerate(types):
    if not isinstance(t, Mapping):
      raise TypeError(f"failure_types[{i}] must be a mapping, got {type(t).__name__}")
    missing = [k for k in ("name", "count") if t.get(k) is None]
    if missing:
      raise ValueError(f"failure_types[{i}] is missing {', '.join(map(repr, missing))}")
  if not types:
    return _section("failure-types", "Discovered failure types", _na())
  shares = [_mapping(t, "share", f"failure_types[{i}]") for i, t in enumerate(types)]
  rates = [_mapping(t, "rate", f"failure_types[{i}]") for i, t in enumerate(types)]
  models = _union(shares + rates)
  head = "".join(f"<th class=\"num\">{_e(m)} rate</th><th class=\"num\">{_e(m)} share</th>"
                 for m in models)
  rows = "".join(
      f"<tr><td class=\"num\">{i + 1}</td><td>{_e(t['name'])}</td>"
      f"<td class=\"num\">{_int(t['count'])}</td>"
      + "".join(f"<td class=\"num\">{_pct(r.get(m))}</td><td class=\"num\">{_pct(s.get(m))}</td>"
                for m in models) + "</tr>"
      for i, (t, s, r) in enumerate(zip(types, shares, rates, strict=True)))
  table = ("<table id=\"failure-table\"><thead><tr><th class=\"num\">rank</th><th>type</th>"
           f"<th class=\"num\">count</th>{head}</tr></thead><tbody>{rows}</tbody></table>")
  chart = (_share_chart([str(t["name"]) for t in types], models, shares) if models
           else _na("no per-model shares"))
  return _section("failure-types", "Discovered failure types",
                  f"{table}\n<h3>Share of each model's failures per type</h3>\n{chart}")


def _share_chart(names: Sequence[str], models: Sequence, shares: Sequence[Mapping]) -> str:
  """Horizontal grouped bars: one group per failure type, one bar per model."""
  label_w, plot_w, bar_h, gap, row = 200, 440, 12, 10, 16
  legend_h = row * len(models) + 8
  group_h = bar_h * len(models) + gap
  values = [[_real(s.get(m)) for m in models] for s in shares]
  top = max((v for vs in values for v in vs if v is not None), default=0.0)
  xmax = top if top > 0 else 1.0
  x0, y0 = label_w, legend_h + 4
  height = y0 + group_h * len(names) + 22
  width = label_w + plot_w + 70
  out = [(f"<svg id=\"share-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" "
          f"height=\"{_fmt(height)}\" viewBox=\"0 0 {width} {_fmt(height)}\" role=\"img\" "
          "aria-label=\"failure share per type and model\">")]
  for j, m in enumerate(models):
    y = 4 + row * j
    out.append(f"<g class=\"legend\"><rect class=\"swatch\" x=\"{x0}\" y=\"{y}\" width=\"12\" "
               f"height=\"12\" fill=\"{PALETTE[j % len(PALETTE)]}\"/><text x=\"{x0 + 18}\" "
               f"y=\"{y + 10}\">{_e(_clip(str(m), 60))}</text></g>")
  bottom = y0 + group_h * len(names)
  for k in range(5):
    v = xmax * k / 4
    x = x0 + plot_w * k / 4
    out.append(f"<line class=\"grid\" x1=\"{_fmt(x)}\" y1=\"{y0}\" x2=\"{_fmt(x)}\" "
               f"y2=\"{_fmt(bottom)}\"/><text x=\"{_fmt(x)}\" y=\"{_fmt(bottom + 14)}\" "
               f"text-anchor=\"middle\">{_pct(v)}</text>")
  for i, (name, vs) in enumerate(zip(names, values, strict=True)):
    gy = y0 + group_h * i + gap / 2
    out.append(f"<text x=\"{x0 - 8}\" y=\"{_fmt(gy + bar_h * len(models) / 2 + 4)}\" "
               f"text-anchor=\"end\"><title>{_e(name)}</title>{_e(_clip(name, 30))}</text>")
    for j, (m, v) in enumerate(zip(models, vs, strict=True)):
      y = gy + bar_h * j
      tip = _e(f"{m} \u2014 {name}: {_pct(v)}")
      if v is not None and v > 0:
        w = plot_w * min(v, xmax) / xmax
        out.append(f"<rect class=\"bar\" x=\"{x0}\" y=\"{_fmt(y)}\" width=\"{_fmt(max(w, 1.0))}\" "
                   f"height=\"{bar_h - 2}\" fill=\"{PALETTE[j % len(PALETTE)]}\">"
                   f"<title>{tip}</title></rect>")
      else:
        w = 0.0
      out.append(f"<text x=\"{_fmt(x0 + w + 4)}\" y=\"{_fmt(y + bar_h - 3)}\">"
                 f"<title>{tip}</title>{_pct(v)}</text>")
  out.append(f"<line class=\"axis\" x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{_fmt(bottom)}\"/>")
  out.append("</svg>")
  return "\n".join(out)


def _unlabelled(facts: Mapping) -> str:
  """Failure types without skill labels; "" (no section) when not given."""
  unl = facts.get("unlabelled")
  if unl is None:
    return ""
  if not isinstance(unl, Mapping):
    raise TypeError(f"facts['unlabelled'] must be a mapping, got {type(unl).__name__}")
  heading = "Failure types without labels"
  types = _sequence(unl, "failure_types")
  check = _mapping(unl, "check", "facts['unlabelled']")
  stats = [("clusters", _int(unl.get("clusters"))),
           ("named by a model (validated)",
            _int(sum(1 for t in types if isinstance(t, Mapping)
                     and t.get("named_by") not in (None, "descriptive")))),
           ("planted-gap recall, unlabelled", _pct(unl.get("planted_gap_recall")))]
  if "labelled_recall" in unl:
    stats.append(("planted-gap recall, labelled", _pct(unl.get("labelled_recall"))))
  for key, label in (("ari_skill_answer", "ARI vs skill:answer"),
                     ("ari_labelled_types", "ARI vs labelled types")):
    if key in check:
      v = _real(check.get(key))
      stats.append((label, NA if v is None else f"{v:.3f}"))
  head = "".join(f"<div class=\"stat\">{_e(k)}<b>{v}</b></div>" for k, v in stats)
  if not types:
    return _section("unlabelled", heading, f"<div class=\"stats\">{head}</div>\n{_na()}")
  rates = [_mapping(t, "rate", f"unlabelled failure_types[{i}]") for i, t in enumerate(types)]
  models = _union(rates)
  rows, cards = [], []
  for i, (t, r) in enumerate(zip(types, rates, strict=True)):
    if not isinstance(t, Mapping) or t.get("name") is None:
      raise ValueError(f"unlabelled failure_types[{i}] must be a mapping with a 'name'")
    by = t.get("named_by") or "descriptive"
    badge = ("<span class=\"badge descr\">descriptive</span>" if by == "descriptive"
             else f"<span class=\"badge validated\">{_e(by)}</span>")
    tried = [c for c in (t.get("candidates") or ()) if isinstance(c, Mapping)]
    kept = [c for c in tried if c.get("kept")]
    best = max(kept or tried, key=lambda c: (_real(c.get("member_rate")) or 0)
               - (_real(c.get("nonmember_rate")) or 0), default=None)
    val = (NA if best is None else f"{_pct(best.get('member_rate'))} vs "
           f"{_pct(best.get('nonmember_rate'))} ({len(kept)}/{len(tried)} kept)")
    rows.append(f"<tr><td class=\"num\">{i + 1}</td><td>{_e(t['name'])}{badge}</td>"
                f"<td class=\"num\">{_int(t.get('size'))}</td>"
                f"<td class=\"num\">{_int(t.get('count'))}</td>"
                f"<td class=\"num\">{_int(t.get('probes'))}</td>"
                + "".join(f"<td class=\"num\">{_pct(r.get(m))}</td>" for m in models)
                + f"<td>{val}</td></tr>")
    figs = []
    for item in t.get("gallery") or ():
      if item.get("image") is None:
        continue
      uri = _png_uri(item, "image")
      h, w = np.shape(item["image"])[:2]
      cap = f"{item.get('question', '')} \u2192 {item.get('pseudo_label', '')}"
      figs.append(f"<figure><img class=\"px\" src=\"{uri}\" width=\"{w * 2}\" "
                  f"height=\"{h * 2}\" alt=\"{_e(item.get('id'))}\">"
                  f"<figcaption>{_e(_clip(cap, 80))}</figcaption></figure>")
    desc = (f"<p class=\"muted\">descriptive: {_e(t.get('descriptive'))}</p>"
            if by != "descriptive" and t.get("descriptive") else "")
    cards.append(f"<article class=\"card\" id=\"unl-{i}\"><h3>{i + 1}. {_e(t['name'])}"
                 f"{badge}</h3>{desc}<div class=\"thumbs\">{''.join(figs) or _na('no images')}"
                 "</div></article>")
  mhead = "".join(f"<th class=\"num\">{_e(m)} rate</th>" for m in models)
  table = ("<table id=\"unlabelled-table\"><thead><tr><th class=\"num\">rank</th><th>name</th>"
           "<th class=\"num\">size</th><th class=\"num\">count</th><th class=\"num\">probes</th>"
           f"{mhead}<th>validation (members vs non-members)</th></tr></thead>"
           f"<tbody>{''.join(rows)}</tbody></table>")
  note = ("<p class=\"muted\">Clusters of the failure exemplars' embeddings. A name marked "
          "<i>descriptive</i> was built from the members' question words and answers "
          "because no model-written name separated members from non-members.</p>")
  return _section("unlabelled", heading,
                  f"<div class=\"stats\">{head}</div>\n{note}\n{table}\n"
                  f"<div class=\"cards\">{''.join(cards)}</div>")


def _planted_gaps(facts: Mapping) -> str:
  gaps = _mapping(facts, "planted_gaps")
  rows, found, total = [], 0, 0
  for model, specs in gaps.items():
    if not isinstance(specs, Mapping):
      raise TypeError(f"planted_gaps[{model!r}] must be a mapping of gap specs")
    for spec, g in specs.items():
      g = g if isinstance(g, Mapping) else {}
      hit = bool(g.get("found"))
      found, total = found + hit, total + 1
      status = ("<span class=\"found\">found</span>" if hit
                else "<span class=\"missed\">missed</span>")
      kind = g.get("type")
      rows.append(f"<tr><td>{_e(model)}</td><td><code>{_e(spec)}</code></td><td>{status}</td>"
                  f"<td class=\"num\">{_int(g.get('rank'))}</td>"
                  f"<td>{_e(kind) if kind is not None else NA}</td></tr>")
  if not rows:
    return _section("planted-gaps", "Planted gaps", _na())
  content = (f"<p>{found} of {total} planted gaps found.</p>\n<table id=\"gap-table\"><thead>"
             "<tr><th>model</th><th>gap spec</th><th>status</th><th class=\"num\">rank</th>"
             f"<th>matched type</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
  return _section("planted-gaps", "Planted gaps", content)


def _png_uri(item: Mapping, field: str) -> str:
  image = np.asarray(item.get(field))
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"gallery item {item.get('id')!r}: {field!r} must be a uint8 [H, W, 3] "
                     f"array, got {image.dtype} {list(image.shape)}")
  return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def _figure(item: Mapping, field: str, caption: str) -> str:
  if item.get(field) is None:
    return f"<figure><span class=\"na\">{_e(caption)} not available</span></figure>"
  uri = _png_uri(item, field)
  h, w = np.shape(item[field])[:2]
  return (f"<figure><img class=\"px\" src=\"{uri}\" width=\"{w * SCALE}\" "
          f"height=\"{h * SCALE}\" alt=\"{_e(caption)} of {_e(item.get('id'))}\">"
          f"<figcaption>{_e(caption)}</figcaption></figure>")


def _gallery(gallery: Sequence[Mapping]) -> str:
  if not gallery:
    return _section("gallery", "Exemplar gallery", _na())
  cards = []
  for i, item in enumerate(gallery):
    if not isinstance(item, Mapping):
      raise TypeError(f"gallery[{i}] must be a mapping, got {type(item).__name__}")
    answers = _mapping(item, "answers", f"gallery item {item.get('id')!r}")
    label = item.get("pseudo_label")
    failed = item.get("failed")   # the caller's verdict (its answer normalisation), if given
    rows = []
    for model, a in answers.items():
      if failed is not None:
        differs = model in failed
      else:
        differs = label is not None and a is not None and not _same_answer(a, label)
      mark = " class=\"differs\" title=\"differs from the pseudo-label\"" if differs else ""
      sign = " \u2260" if differs else ""
      rows.append(f"<dt>{_e(model)}</dt><dd{mark}>{_e(a) if a is not None else NA}{sign}</dd>")
    field = functools.partial(_text, item)
    cards.append(
        f"<article class=\"card\" id=\"ex-{i}\">\n<h3>{field('id')} "
        f"<span class=\"muted\">{field('route')} \u00b7 {field('category')}</span></h3>\n"
        f"<div>{_figure(item, 'seed_image', 'seed')}"
        f"{_figure(item, 'image', 'counterfactual')}</div>\n<dl>"
        f"<dt>auditor</dt><dd>{field('auditor_text')}</dd>"
        f"<dt>question</dt><dd>{field('question')}</dd>"
        f"<dt>pseudo-label</dt><dd>{field('pseudo_label')}</dd>"
        f"<dt>truth</dt><dd>{field('truth')}</dd></dl>\n"
        f"<dl class=\"answers\">{''.join(rows) or '<dt>answers</dt><dd>' + NA + '</dd>'}</dl>"
        "\n</article>")
  return _section("gallery", "Exemplar gallery",
                  "<p class=\"muted\">Answers marked \u2260 differ from the pseudo-label.</p>\n"
                  f"<div class=\"cards\">\n{chr(10).join(cards)}\n</div>")


def _accuracy(facts: Mapping) -> str:
  before, after = _mapping(facts, "accuracy_before"), _mapping(facts, "accuracy_after")
  gapped = _mapping(facts, "gapped_skills")
  models = _union([before, after])
  if not models:
    return _section("accuracy", "Benchmark accuracy before and after rectification", _na())
  tables = []
  for m in models:
    b = before.get(m) or {}
    a = after.get(m) or {}
    skills = [s for s in _union([b, a]) if s != "overall"] + ["overall"]
    marked = {str(s) for s in (gapped.get(m) or ())}
    rows = []
    for s in skills:  # deltas in percentage points
      vb, va = _real(b.get(s)), _real(a.get(s))
      if vb is None or va is None:
        delta = NA
      else:
        d = 100 * (va - vb)
        cls = "up" if d > 0 else "down" if d < 0 else ""
        delta = f"<span class=\"{cls}\">{d:+.1f} pt</span>"
      gap = str(s) in marked
      badge = "<span class=\"badge\">gap</span>" if gap else ""
      name = f"<b>{_e(s)}</b>" if s == "overall" else _e(s)
      attr = " class=\"gapped\"" if gap else ""
      rows.append(f"<tr{attr}><td>{name}{badge}</td>"
                  f"<td class=\"num\">{_pct(b.get(s))}</td><td class=\"num\">{_pct(a.get(s))}"
                  f"</td><td class=\"num\">{delta}</td></tr>")
    tables.append(f"<div><h3>{_e(m)}</h3><table class=\"accuracy\"><thead><tr><th>skill</th>"
                  "<th class=\"num\">before</th><th class=\"num\">after</th>"
                  f"<th class=\"num\">\u0394</th></tr></thead><tbody>{''.join(rows)}</tbody>"
                  "</table></div>")
  return _section("accuracy", "Benchmark accuracy before and after rectification",
                  "<p class=\"muted\">Gapped skills are highlighted.</p>\n"
                  f"<div class=\"flex\">{''.join(tables)}</div>")


def _learning_curve(facts: Mapping) -> str:
  heading = "Auditor learning curve"
  points = []
  for i, p in enumerate(_sequence(facts, "learning_curve")):
    if not isinstance(p, Mapping):
      raise TypeError(f"learning_curve[{i}] must be a mapping, got {type(p).__name__}")
    step = _real(p.get("step"))
    if step is not None:
      points.append((step, [_real(p.get(k)) for k, _ in SERIES]))
  points.sort(key=lambda p: p[0])
  if not points:
    return _section("learning", heading, _na())
  w, h, left, right, top, bottom = 640, 280, 52, 16, 30, 40
  xs = [s for s, _ in points]
  ys = [v for _, vs in points for v in vs if v is not None]
  xlo, xhi = xs[0], xs[-1]
  whole = all(x == int(x) for x in xs)
  if xhi == xlo:
    xlo, xhi = xlo - 1, xhi + 1
  ylo, yhi = min([0.0] + ys), max([1.0] + ys)
  px = lambda x: left + (w - left - right) * (x - xlo) / (xhi - xlo)
  py = lambda y: h - bottom - (h - top - bottom) * (y - ylo) / (yhi - ylo)
  out = [(f"<svg id=\"learning-curve\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" "
          f"height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" "
          "aria-label=\"auditor reward and success rate per step\">")]
  for k in range(5):
    yv, xv = ylo + (yhi - ylo) * k / 4, xlo + (xhi - xlo) * k / 4
    if whole and xhi - xlo >= 4:
      xv = round(xv)
    out.append(f"<line class=\"grid\" x1=\"{left}\" y1=\"{_fmt(py(yv))}\" x2=\"{w - right}\" "
               f"y2=\"{_fmt(py(yv))}\"/><text x=\"{left - 6}\" y=\"{_fmt(py(yv) + 4)}\" "
               f"text-anchor=\"end\">{yv:.2g}</text>"
               f"<text x=\"{_fmt(px(xv))}\" y=\"{h - bottom + 16}\" text-anchor=\"middle\">"
               f"{xv:.4g}</text>")
  out.append(f"<text x=\"{(w + left) // 2}\" y=\"{h - 6}\" text-anchor=\"middle\">step</text>")
  out.append(f"<polyline class=\"axis\" fill=\"none\" points=\"{left},{top} {left},"
             f"{h - bottom} {w - right},{h - bottom}\"/>")
  for j, (name, colour) in enumerate(SERIES):
    lx = left + 10 + 130 * j
    out.append(f"<g class=\"legend\"><rect x=\"{lx}\" y=\"8\" width=\"14\" height=\"4\" "
               f"fill=\"{colour}\"/><text x=\"{lx + 20}\" y=\"14\">{name}</text></g>")
    # Missing values break the line into segments.
    segments = [[]]
    for step, vs in points:
      if vs[j] is None:
        segments.append([])
      else:
        segments[-1].append((px(step), py(vs[j]), step, vs[j]))
    for segment in segments:
      if len(segment) > 1:
        coords = " ".join(f"{_fmt(x)},{_fmt(y)}" for x, y, _, _ in segment)
        out.append(f"<polyline class=\"series {name}\" fill=\"none\" stroke=\"{colour}\" "
                   f"stroke-width=\"2\" points=\"{coords}\"/>")
      for x, y, step, v in segment:
        out.append(f"<circle cx=\"{_fmt(x)}\" cy=\"{_fmt(y)}\" r=\"2.5\" fill=\"{colour}\">"
                   f"<title>{name} at step {step:g}: {v:.3g}</title></circle>")
  out.append("</svg>")
  return _section("learning", heading, "\n".join(out))


def _notes(facts: Mapping) -> str:
  notes = [n for n in _sequence(facts, "notes") if n is not None]
  if not notes:
    return _section("notes", "Notes", _na())
  items = "".join(f"<li>{_e(n)}</li>" for n in notes)
  return _section("notes", "Notes", f"<ul>{items}</ul>")
