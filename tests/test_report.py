"""The static HTML report: content, escaping, embedded images, and a real
headless-Chromium render (images decode, charts lay out with visible bars)."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from auditdm_jax.data.records import decode_png
from auditdm_jax.report import html as report

XSS = "<script>alert(1)</script>"
ATTR = "\" onerror=\"alert(2)"
CHROMIUM = "/usr/bin/chromium"
MODELS = ("target_small", "target_large")


def _image(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)


def _facts(**overrides) -> dict:
  facts = {
      "title": "Audit of the tiny run",
      "workdir": "/tmp/auditdm_tiny",
      "planted_gap_recall": 0.75,
      "exemplar_precision": 0.6,
      "planted_gaps": {
          "target_small": {"count:red": {"found": True, "rank": 1, "type": "counting red"},
                           "color:cube": {"found": False, "rank": None, "type": None}},
          "target_large": {"spatial:left": {"found": True, "rank": 2, "type": "left of"}},
      },
      "failure_types": [
          {"name": "counting red", "count": 40,
           "share": {"target_small": 0.5, "target_large": 0.1},
           "rate": {"target_small": 0.4, "target_large": 0.05}},
          {"name": "left of", "count": 25,
           "share": {"target_small": 0.2, "target_large": 0.6},
           "rate": {"target_small": 0.1, "target_large": 0.3}},
          {"name": "materials", "count": 3,
           "share": {"target_small": 0.0, "target_large": 0.05},
           "rate": {"target_small": 0.0, "target_large": 0.01}},
      ],
      "accuracy_before": {m: {"count": 0.5, "color": 0.9, "spatial": 0.8, "overall": 0.7}
                          for m in MODELS},
      "accuracy_after": {m: {"count": 0.8, "color": 0.88, "spatial": 0.85, "overall": 0.82}
                         for m in MODELS},
      "gapped_skills": {"target_small": ["count"], "target_large": ["spatial"]},
      "learning_curve": [{"step": s, "reward": 0.1 + 0.05 * s, "success_rate": 0.02 * s}
                         for s in range(0, 20, 2)],
      "wall_s": {"pretrain": 812.4, "audit": 95.0, "evaluate": 4000.0},
      "notes": ["smoke config", "trained on 1 host"],
  }
  facts.update(overrides)
  return facts


def _exemplar(i: int, **overrides) -> dict:
  item = {
      "id": f"ex{i}", "seed_image": _image(2 * i), "image": _image(2 * i + 1),
      "route": "edit", "auditor_text": "recolor the left cube red",
      "question": "how many red things are there?", "pseudo_label": "two", "truth": "two",
      "category": "counting red", "answers": {"target_small": "three", "target_large": "two"},
  }
  item.update(overrides)
  return item


def _gallery(n: int = 3) -> list[dict]:
  return [_exemplar(i) for i in range(n)]


def _data_uris(text: str) -> list[bytes]:
  return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


# ------------------------------------------------------------------ unit tests

def test_sections_in_order():
  page = report.render(_facts(), _gallery())
  assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
  ids = ["summary", "wall-time", "failure-types", "failure-table", "share-chart",
         "planted-gaps", "gallery", "accuracy", "learning", "learning-curve", "notes"]
  positions = [page.index(f'id="{i}"') for i in ids]
  assert positions == sorted(positions)
  for text in ("75.0%", "60.0%", "13 min 32 s", "1 h 06 min", "counting red", "count:red",
               "missed", "2 of 3 planted gaps found", "+30.0 pt", "smoke config"):
    assert text in page, text
  # Only non-zero shares get a bar; every bar has a tooltip.
  assert page.count('<rect class="bar"') == 5
  assert page.count("<title>") > 5
  # Nothing external: no scripts, no remote or relative URLs.
  assert "<script" not in page
  assert not re.search(r'(?:src|href)="(?!data:)', page)
  assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
  assert "https://" not in page and "@import" not in page and "url(" not in page


def test_marks_differing_answers_and_gapped_skills():
  page = report.render(_facts(), _gallery(1))
  assert page.count('class="differs"') == 1
  assert re.search(r'<dd class="differs"[^>]*>three \u2260</dd>', page)
  assert page.count('<tr class="gapped">') == 2
  assert page.count('class="badge">gap<') == 2


def test_escapes_model_and_config_text():
  evil = XSS + ATTR
  facts = _facts(
      title=evil, workdir=evil, notes=[evil],
      failure_types=[{"name": evil, "count": 1, "share": {evil: 0.5}, "rate": {evil: 0.1}}],
      planted_gaps={evil: {evil: {"found": True, "rank": 1, "type": evil}}},
      accuracy_before={evil: {evil: 0.5, "overall": 0.5}},
      accuracy_after={evil: {evil: 0.6, "overall": 0.6}},
      gapped_skills={evil: [evil]})
  item = _exemplar(0, id=evil, route=evil, auditor_text=evil, question=evil, pseudo_label=evil,
                   truth=evil, category=evil, answers={evil: evil, "m": evil})
  page = report.render(facts, [item])
  assert "<script" not in page
  assert "onerror=\"" not in page and "\" onerror" not in page
  escaped = html.escape(evil, quote=True)
  assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot; onerror=&quot;alert(2)" == escaped
  assert page.count(escaped) >= 15
  # Escaped inside the SVG tooltips and the image alt attributes too.
  assert f"<title>{escaped}" in page
  assert f'alt="seed of {escaped}"' in page


def test_images_are_data_uris_that_decode_back():
  gallery = _gallery(2)
  page = report.render(_facts(), gallery)
  pngs = _data_uris(page)
  assert len(pngs) == 4
  want = [g[k] for g in gallery for k in ("seed_image", "image")]
  for png, image in zip(pngs, want, strict=True):
    np.testing.assert_array_equal(decode_png(png), image)
  assert "image-rendering:pixelated" in page
  assert page.count('width="144" height="144"') == 4


def test_nan_and_missing_values_render():
  nan = float("nan")
  facts = _facts(
      planted_gap_recall=nan, exemplar_precision=None, wall_s={"audit": nan, "eval": None},
      failure_types=[{"name": "a", "count": 2, "share": {"m": nan, "n": 0.3},
                      "rate": {"m": None}}],
      accuracy_before={"m": {"count": nan, "overall": 0.5}},
      accuracy_after={"m": {"count": 0.7, "overall": nan}},
      learning_curve=[{"step": 0, "reward": nan, "success_rate": 0.1},
                      {"step": 1, "reward": 0.5, "success_rate": None},
                      {"step": 2, "reward": 0.6, "success_rate": 0.2},
                      {"step": nan, "reward": 1.0, "success_rate": 1.0}])
  page = report.render(facts, [_exemplar(0, truth=None, answers={})])
  assert "n/a" in page
  text = re.sub(r"data:image/png;base64,[^\"]+", "", page).lower()
  assert not re.search(r"\b(nan|inf)\b", text)
  assert page.count('<rect class="bar"') == 1
  for svg in re.findall(r"<svg.*?</svg>", page, re.DOTALL):
    for coords in re.findall(r'(?:x|y|x1|y1|x2|y2|cx|cy|width|height|points)="([^"]*)"', svg):
      assert re.fullmatch(r"[-0-9., ]+", coords), coords


@pytest.mark.parametrize("facts", [{}, None, _facts(learning_curve=[]), _facts(
    learning_curve=[{"step": 3, "reward": 0.5, "success_rate": 0.5}])])
def test_empty_inputs_render(facts):
  page = report.render(facts, [])
  assert page.count("not available") >= (1 if facts else 6)
  for section in ("summary", "failure-types", "planted-gaps", "gallery", "accuracy", "learning"):
    assert f'id="{section}"' in page


def test_single_point_learning_curve_has_marker():
  page = report.render(_facts(learning_curve=[{"step": 3, "reward": 0.5, "success_rate": 0.5}]))
  svg = re.search(r'<svg id="learning-curve".*?</svg>', page, re.DOTALL).group(0)
  assert svg.count("<circle") == 2 and 'class="series' not in svg


@pytest.mark.parametrize("field,image", [
    ("image", np.zeros((48, 48), np.uint8)),
    ("seed_image", np.zeros((48, 48, 3), np.float32)),
    ("image", np.zeros((48, 48, 4), np.uint8)),
    ("image", np.zeros(5, np.uint8)),
])
def test_bad_image_names_item_and_field(field, image):
  gallery = [_exemplar(0), _exemplar(1, **{field: image})]
  with pytest.raises(ValueError, match=rf"'ex1'.*'{field}'.*uint8 \[H, W, 3\]"):
    report.render(_facts(), gallery)


@pytest.mark.parametrize("missing", ["name", "count"])
def test_bad_failure_type_names_index(missing):
  types = _facts()["failure_types"]
  del types[1][missing]
  with pytest.raises(ValueError, match=rf"failure_types\[1\] is missing '{missing}'"):
    report.render(_facts(failure_types=types), [])


def test_write_is_atomic(tmp_path):
  path = tmp_path / "out" / "report.html"
  report.write(path, _facts(), _gallery())
  assert path.read_text() == report.render(_facts(), _gallery())
  assert os.listdir(path.parent) == ["report.html"]


# ---------------------------------------------------------------- browser test

CHECK_JS = """<script>
window.addEventListener("load", () => {
  const visible = (el) => { const b = el.getBBox(); return b.width > 0 && b.height > 0; };
  const imgs = Array.from(document.images);
  const chart = document.getElementById("share-chart");
  const bars = chart ? Array.from(chart.querySelectorAll("rect.bar")) : [];
  const curve = document.getElementById("learning-curve");
  const lines = curve ? Array.from(curve.querySelectorAll("path, polyline.series")) : [];
  const result = {
    images: imgs.length,
    images_ok: imgs.filter((i) => i.complete && i.naturalWidth > 0).length,
    chart: !!chart,
    bars: bars.length,
    bars_visible: bars.filter((b) => b.getBBox().width > 0).length,
    curve: !!curve,
    lines_visible: lines.filter(visible).length,
  };
  const pre = document.createElement("pre");
  pre.id = "check";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
  profile = tmp_path / "profile"
  profile.mkdir(exist_ok=True)
  cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
  env = {**os.environ, "HOME": str(tmp_path)}
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


def _require_chromium() -> None:
  """Fails (does not skip) without the browser, unless AUDITDM_NO_BROWSER=1."""
  if os.path.exists(CHROMIUM):
    return
  if os.environ.get("AUDITDM_NO_BROWSER") == "1":
    pytest.skip("AUDITDM_NO_BROWSER=1: browser test skipped")
  pytest.fail(f"{CHROMIUM} not found: run `bash tests/install_system_deps.sh` (installs Debian's "
              "chromium), or set AUDITDM_NO_BROWSER=1 to skip the browser test")


def test_renders_in_headless_chromium(tmp_path):
  _require_chromium()
  facts, gallery = _facts(), _gallery()
  report.write(tmp_path / "report.html", facts, gallery)
  page = (tmp_path / "report.html").read_text()
  probe = tmp_path / "probe.html"
  probe.write_text(page.replace("</body>", CHECK_JS + "</body>"))

  run = _chromium(tmp_path, "--dump-dom", probe.as_uri())
  found = re.search(r'<pre id="check">(.*?)</pre>', run.stdout, re.DOTALL)
  assert found, f"no check result (rc={run.returncode}):\n{run.stderr[-3000:]}"
  got = json.loads(html.unescape(found.group(1)))
  nonzero = sum(1 for t in facts["failure_types"] for v in t["share"].values() if v > 0)
  assert got == {"images": 2 * len(gallery), "images_ok": 2 * len(gallery), "chart": True,
                 "bars": nonzero, "bars_visible": nonzero, "curve": True,
                 "lines_visible": 2}, got

  shot = tmp_path / "shot.png"
  run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000",
                  (tmp_path / "report.html").as_uri())
  assert shot.exists(), f"no screenshot (rc={run.returncode}):\n{run.stderr[-3000:]}"
  pixels = decode_png(shot.read_bytes())
  assert pixels.shape[:2] == (3000, 1200)
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16
  shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# ------------------------------------------------- failure types without labels

def _unlabelled(evil: str = "colour: purple") -> dict:
  return {"clusters": 2, "planted_gap_recall": 1.0, "labelled_recall": 1.0,
          "check": {"ari_skill_answer": 0.81, "ari_labelled_types": 0.93},
          "failure_types": [
              {"name": evil, "named_by": "auditor:question", "descriptive": "what colour -> purple",
               "size": 24, "count": 24, "probes": 30, "rate": {"target_small": 0.8},
               "candidates": [{"name": evil, "member_rate": 0.9, "nonmember_rate": 0.1,
                               "kept": True}],
               "gallery": [{"id": "u0", "image": _image(7), "question": evil,
                            "pseudo_label": "purple"}]},
              {"name": "how many -> 5 (40%)", "named_by": "descriptive", "size": 80,
               "count": 70, "probes": 90, "rate": {"target_small": 0.78}, "candidates": [],
               "gallery": []}]}


def test_unlabelled_section_shows_names_sizes_and_images_and_is_optional():
  assert 'id="unlabelled"' not in report.render(_facts(), _gallery())
  page = report.render(_facts(unlabelled=_unlabelled()), _gallery(1))
  ids = ["failure-types", "unlabelled", "unlabelled-table", "planted-gaps", "gallery"]
  positions = [page.index(f'id="{i}"') for i in ids]
  assert positions == sorted(positions)
  for text in ("ARI vs skill:answer", "0.810", "0.930", "how many -&gt; 5 (40%)",
               ">descriptive<", "auditor:question", "90.0% vs 10.0% (1/1 kept)"):
    assert text in page, text
  pngs = _data_uris(page)
  assert len(pngs) == 3          # the gallery card's two and the type's one
  np.testing.assert_array_equal(decode_png(pngs[0]), _image(7))


def test_unlabelled_section_escapes_model_written_names():
  evil = XSS + ATTR
  page = report.render(_facts(unlabelled=_unlabelled(evil)), [])
  assert "<script" not in page and "onerror=\"" not in page
  assert page.count(html.escape(evil, quote=True)) >= 2
