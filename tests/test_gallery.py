"""The HTML gallery: pages from a fake run folder, checked as files and in headless Chromium.

The browser tests drive Debian's Chromium through selenium and Debian's chromedriver, from
file:// with no network. Without them the tests fail (not skip) and say what to install.
Screenshots land in pytest's tmp folder; with SDSJAX_DOCS_SCREENSHOT=1 the prompt page's is
also copied to docs/gallery_screenshot.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdsjax import export
from sdsjax import gallery
from sdsjax import morphable

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "apt-get update && apt-get install -y chromium chromium-driver"
REPO = Path(__file__).resolve().parents[1]
XSS_PROMPT = "<script>alert(1)</script> & a 'quoted' \"head\""
XSS_NAME = "</script><img src=x onerror=alert(2)>"

# ---------------------------------------------------------------------------------------------
# A fake run folder with real files


@pytest.fixture(scope="module")
def head():
  return morphable.load_model("builtin", 8)


def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
  tri = verts[faces]
  face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  normals = np.zeros_like(verts)
  for c in range(3):
    np.add.at(normals, faces[:, c], face_normals)
  return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def splat_views(verts, faces, colour, size: int = 96, azimuths=tuple(range(0, 360, 45))):
  """(N, size, size, 3) cheap orthographic point-splat renders (a z-buffer over vertices)."""
  normals = _vertex_normals(verts, faces)
  light = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
  views = []
  for az in azimuths:
    a = np.radians(az)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    v, n = verts @ rot.T, normals @ rot.T
    shade = np.clip(n @ light, 0, 1)[:, None] * 0.75 + 0.25
    px = np.clip(((v[:, :2] * [1, -1]) * 0.45 + 0.5) * (size - 1), 0, size - 1).astype(int)
    image = np.ones((size, size, 3))
    depth = np.full((size, size), -np.inf)
    for (x, y), z, c in zip(px, v[:, 2], shade * colour):
      for dy in (0, 1):
        for dx in (0, 1):
          yy, xx = min(y + dy, size - 1), min(x + dx, size - 1)
          if z > depth[yy, xx]:
            depth[yy, xx], image[yy, xx] = z, c
    views.append(image)
  return np.stack(views)


def write_prompt_folder(folder: Path, head, seed: int, textured: bool, names=None, steps=120):
  """Writes one "done" prompt folder as the fit loop does."""
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=head.num_components).astype(np.float32) * 1.3
  verts = np.asarray(morphable.vertices(head, weights))
  faces = np.asarray(head.faces)
  texture = None
  arrays = {"weights": weights, "names": np.array(names or head.names)}
  if textured:
    # Red top half, blue bottom half of the UV square: the 3D view's colours must show both.
    texture = np.zeros((32, 32, 3), np.float32)
    texture[:16] = (0.85, 0.2, 0.2)
    texture[16:] = (0.2, 0.3, 0.85)
    arrays["texture"] = texture
    arrays["expression"] = rng.normal(size=4).astype(np.float32)
    arrays["expression_names"] = np.array(["smile", "jaw_open", "brow_up", "blink"])
  with export.atomic_write(folder / "params.npz") as f:
    np.savez(f, **arrays)
  uvs, uv_faces = np.asarray(head.uvs), np.asarray(head.uv_faces)
  export.write_obj(folder / "head.obj", verts, faces, uvs, uv_faces, texture)
  export.write_glb(folder / "head.glb", verts, faces, uvs, uv_faces, texture)
  colour = np.array([0.8, 0.45, 0.45]) if textured else np.array([0.85, 0.7, 0.6])
  views = splat_views(verts, faces, colour)
  export.write_png(folder / "turntable.png", export.image_grid(views, columns=4))
  export.write_gif(folder / "evolution.gif", views[[0, 1, 0, 7]])
  lines = []
  for step in range(1, steps + 1):
    loss = float(1.0 / np.sqrt(step) + 0.05 * rng.random())
    row = {"step": step, "loss": loss, "grad_norm": loss * 40, "t": 0.5, "finite": True}
    if step == 7:
      row.update(loss=None, grad_norm=None, finite=False)
    lines.append(json.dumps(row))
  # A line cut short by a crash must not break the page.
  (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 121, "lo')


def make_run(out: Path, head) -> dict:
  """A run of five prompts: two done (one textured), an XSS prompt done, a pending, a failed."""
  prompts = [
    ("an old man", "done", False),
    ("a clown with face paint", "done", True),
    (XSS_PROMPT, "done", False),
    ("a young woman", "pending", False),
    ("a bearded viking", "failed", False),
  ]
  records = []
  for i, (prompt, status, textured) in enumerate(prompts):
    slug = f"p{i}-" + "-".join(w for w in prompt.lower().split() if w.isalpha())[:30]
    records.append(
      {
        "index": i,
        "prompt": prompt,
        "slug": slug,
        "seed": i,
        "wave": i // 2,
        "status": status,
        "folder": slug,
      }
    )
    if status == "done":
      names = [XSS_NAME, *head.names[1:]] if prompt == XSS_PROMPT else None
      write_prompt_folder(out / slug, head, i, textured, names)
  run = {
    "version": 2,
    "prompts": records,
    "config": {"steps": 120, "num_components": 8, "num_expressions": 0},
    "timings": {},
    "devices": ["cpu"],
  }
  out.mkdir(parents=True, exist_ok=True)
  (out / "run.json").write_text(json.dumps(run))
  return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, head):
  out = tmp_path_factory.mktemp("run")
  run = make_run(out, head)
  index = gallery.write_gallery(out)
  return out, run, index


NOUNS = ("man", "woman", "viking", "clown", "elf", "robot", "knight", "pirate")
ADJECTIVES = ("old", "young", "bearded", "smiling", "tired", "angry", "bald", "freckled")


@pytest.fixture(scope="module")
def big_run(tmp_path_factory, run_dir):
  """1000 prompts; the done ones link one shared turntable (no mesh, so pages build fast)."""
  small, _, _ = run_dir
  out = tmp_path_factory.mktemp("big")
  shared = small / "p0-an-old-man" / "turntable.png"
  records = []
  for i in range(1000):
    prompt = f"prompt {i:04d}: a {ADJECTIVES[i % 8]} {NOUNS[(i // 8) % 8]}"
    status = "pending" if i % 10 == 9 else "done"
    folder = f"prompt-{i:04d}"
    if status == "done":
      (out / folder).mkdir()
      (out / folder / "turntable.png").symlink_to(shared)
    records.append(
      {"index": i, "prompt": prompt, "slug": folder, "seed": i, "status": status, "folder": folder}
    )
  (out / "run.json").write_text(json.dumps({"version": 2, "prompts": records, "config": {}}))
  return out, gallery.write_gallery(out)


# ---------------------------------------------------------------------------------------------
# Files


def test_pages_for_done_prompts_only(run_dir):
  out, run, index = run_dir
  assert index == out / "index.html"
  for record in run["prompts"]:
    page = out / record["folder"] / "index.html"
    assert page.is_file() == (record["status"] == "done"), record
  # plotly.js is written once, at the top, and every page loads it from there.
  assert (out / "plotly.min.js").stat().st_size > 1_000_000
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob("plotly*.js")) == ["plotly.min.js"]
  page = (out / "p1-a-clown-with-face-paint" / "index.html").read_text(encoding="utf-8")
  assert '<script src="../plotly.min.js"' in page
  assert "mesh3d" in page and "vertexcolor" in page
  for link in ("head.glb", "head.obj", "head.mtl", "params.npz", "texture.png"):
    assert f'href="{link}"' in page
  assert not list(out.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_no_network_references(run_dir):
  out, _, _ = run_dir
  for page in out.rglob("index.html"):
    text = page.read_text(encoding="utf-8")
    for scheme in ('src="http', "src='http", 'href="http', "@import", "cdn.plot.ly"):
      assert scheme not in text, (page, scheme)


def test_prompt_text_is_escaped(run_dir):
  out, run, _ = run_dir
  xss = next(r for r in run["prompts"] if r["prompt"] == XSS_PROMPT)
  for page in [out / "index.html", out / xss["folder"] / "index.html"]:
    text = page.read_text(encoding="utf-8")
    assert "<script>alert(1)" not in text
    assert "<img src=x" not in text
  page = (out / xss["folder"] / "index.html").read_text(encoding="utf-8")
  assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; a" in page


def test_index_lists_every_prompt(run_dir):
  out, run, _ = run_dir
  text = (out / "index.html").read_text(encoding="utf-8")
  start = text.index('id="prompt-data">') + len('id="prompt-data">')
  entries = json.loads(text[start : text.index("</script>", start)])
  assert [e["prompt"] for e in entries] == [r["prompt"] for r in run["prompts"]]
  by_status = {e["status"]: e for e in entries}
  assert by_status["pending"]["page"] is None and by_status["failed"]["thumb"] is None
  done = [e for e in entries if e["status"] == "done"]
  assert all(e["page"].endswith("/index.html") and e["thumb"] for e in done)
  assert all(e["loss"] is not None and 0 < e["loss"] < 1 for e in done)


def test_unchanged_pages_are_not_rewritten(tmp_path, head):
  run = make_run(tmp_path, head)
  gallery.write_gallery(tmp_path)
  pages = {r["folder"]: tmp_path / r["folder"] / "index.html" for r in run["prompts"][:3]}
  before = {k: p.stat().st_mtime_ns for k, p in pages.items()}
  os.utime(tmp_path / "plotly.min.js", ns=(1, 1))
  gallery.write_gallery(tmp_path)
  assert {k: p.stat().st_mtime_ns for k, p in pages.items()} == before
  assert (tmp_path / "plotly.min.js").stat().st_mtime_ns == 1, "plotly.js is written once"
  # New metrics for one prompt: only its page changes, and it shows the new step count.
  changed = run["prompts"][0]["folder"]
  with open(tmp_path / changed / "metrics.jsonl", "w") as f:
    for step in range(1, 301):
      f.write(json.dumps({"step": step, "loss": 0.1, "grad_norm": 1.0, "finite": True}) + "\n")
  gallery.write_gallery(tmp_path)
  assert "300 steps" in pages[changed].read_text(encoding="utf-8")
  for k, p in pages.items():
    assert (p.stat().st_mtime_ns == before[k]) == (k != changed), k
  # A prompt that finishes becomes a page and its neighbour's "next" link is updated.
  run["prompts"][3]["status"] = "done"
  write_prompt_folder(tmp_path / run["prompts"][3]["folder"], head, 3, False)
  (tmp_path / "run.json").write_text(json.dumps(run))
  gallery.write_gallery(tmp_path)
  assert (tmp_path / run["prompts"][3]["folder"] / "index.html").is_file()
  assert f"{run['prompts'][3]['folder']}/index.html" in pages[
    run["prompts"][2]["folder"]
  ].read_text(encoding="utf-8")


def test_old_run_json_layout(tmp_path, head):
  write_prompt_folder(tmp_path / "an-old-man", head, 0, False)
  (tmp_path / "run.json").write_text(
    json.dumps({"prompts": ["an old man", "a robot"], "slugs": ["an-old-man", "a-robot"]})
  )
  gallery.write_gallery(tmp_path)
  assert (tmp_path / "an-old-man" / "index.html").is_file()
  assert not (tmp_path / "a-robot").exists()


def test_bad_runs_are_one_line_errors(tmp_path, capsys):
  assert gallery.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "run.json" in err and err.count("\n") == 1
  (tmp_path / "run.json").write_text(json.dumps({"prompts": [{"prompt": "x", "folder": "../x"}]}))
  with pytest.raises(gallery.GalleryError, match="not a folder inside the run"):
    gallery.write_gallery(tmp_path)


def test_cli_prints_the_index_uri(run_dir, capsys):
  out, _, _ = run_dir
  assert gallery.main([str(out)]) == 0
  assert capsys.readouterr().out.strip() == (out / "index.html").resolve().as_uri()


def test_read_metrics_gaps_and_cut_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 2, "loss": null}\n{"step": 1, "loss": 0.5}\n{"step": 3, "loss": Na')
  m = gallery.read_metrics(path)
  np.testing.assert_array_equal(m["step"], [1, 2])
  assert m["loss"][0] == 0.5 and np.isnan(m["loss"][1])
  np.testing.assert_allclose(gallery.moving_average(np.array([1.0, np.nan, 3.0]), 2), [1, 1, 3])


def test_sample_texture_orientation():
  # Row 0 is the top of the image, which is v = 1.
  texture = np.zeros((2, 2, 3))
  texture[0, 0], texture[0, 1], texture[1, 0], texture[1, 1] = (1, 0, 0), (0, 1, 0), (0, 0, 1), 1
  got = gallery.sample_texture(texture, np.array([[0, 1], [1, 1], [0, 0], [1, 0], [0.5, 0.5]]))
  np.testing.assert_allclose(got[:4], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
  np.testing.assert_allclose(got[4], np.mean(texture.reshape(4, 3), 0))


def test_glb_colours_follow_the_texture(run_dir):
  out, _, _ = run_dir
  verts, _, colours = gallery.load_view_mesh(out / "p1-a-clown-with-face-paint" / "head.glb")
  assert colours is not None and colours.shape == (len(verts), 3)
  reds, blues = colours[:, 0] > 150, colours[:, 2] > 150
  assert reds.sum() > 100 and blues.sum() > 100, "both halves of the texture show"
  plain = gallery.load_view_mesh(out / "p0-an-old-man" / "head.glb")
  assert plain[2] is None and len(plain[1]) == morphable.load_model("builtin", 1).faces.shape[0]


def test_decimate_keeps_the_shape(head):
  verts = np.asarray(head.mean, np.float64)
  faces = np.asarray(head.faces)
  colours = np.full((len(verts), 3), 200, np.uint8)
  v, f, c = gallery.decimate(verts, faces, colours, 4000)
  assert 1000 < len(f) <= 4000 and f.max() < len(v) and c.shape == (len(v), 3)
  # Every kept vertex lies close to the original surface (its cluster's mean).
  nearest = np.min(np.linalg.norm(v[:, None] - verts[None, ::7], axis=-1), axis=1)
  assert np.quantile(nearest, 0.95) < 0.08
  same = gallery.decimate(verts, faces, None, len(faces))
  assert same[1] is faces


# ---------------------------------------------------------------------------------------------
# Headless Chromium


def require_browser(chromium: str = CHROMIUM, driver: str = CHROMEDRIVER) -> None:
  """Fails (never skips) without the browser, so CI cannot pass without running these tests."""
  if not (Path(chromium).exists() and Path(driver).exists()):
    pytest.fail(f"the gallery tests need Debian's Chromium and its driver: {INSTALL_HINT}")


def test_missing_browser_fails_with_the_install_command(tmp_path):
  with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium chromium-driver"):
    require_browser(str(tmp_path / "chromium"), CHROMEDRIVER)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  require_browser()
  try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
  except ImportError:
    pytest.fail("the gallery tests need selenium: pip install -e '.[dev]'")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",  # WebGL in software, for plotly's 3D view
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--allow-file-access-from-files",
    f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    "--window-size=1400,1000",
  ):
    options.add_argument(flag)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
  driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
  driver.set_page_load_timeout(60)
  driver.get("about:blank")  # leave the new-tab page, whose chrome:// requests would interleave
  yield driver
  driver.quit()


def _wait(driver, script: str, timeout: float = 60.0):
  from selenium.webdriver.support.ui import WebDriverWait

  return WebDriverWait(driver, timeout, poll_frequency=0.2).until(
    lambda d: d.execute_script(script)
  )


def _open(driver, path: Path) -> None:
  driver.get_log("browser")  # drop what earlier pages logged
  driver.get_log("performance")
  driver.get(path.resolve().as_uri())


def _check_logs(driver) -> None:
  """No console errors, and no request left the machine (only file:, data:, blob:, chrome:)."""
  errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
  assert not errors, errors
  urls = []
  for entry in driver.get_log("performance"):
    message = json.loads(entry["message"])["message"]
    if message["method"] == "Network.requestWillBeSent":
      urls.append(message["params"]["request"]["url"])
  assert urls, "the performance log records the page's requests"
  local = ("file://", "data:", "blob:", "about:", "chrome://")  # chrome:// is the browser's own
  remote = [u for u in urls if not u.startswith(local)]
  assert not remote, remote


def _images_decoded(driver) -> list[dict]:
  return driver.execute_async_script(
    """
    const done = arguments[arguments.length - 1];
    const imgs = [...document.images];
    imgs.forEach(i => { i.loading = "eager"; });
    Promise.all(imgs.map(i => i.decode().catch(() => null))).then(() =>
      done(imgs.map(i => ({src: i.getAttribute("src"), w: i.naturalWidth}))));
    """
  )


def _screenshot(driver, path: Path, width: int = 1400) -> None:
  for _ in range(2):  # plotly's responsive plots reflow once the window is resized
    height = driver.execute_script(
      "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"
    )
    driver.set_window_size(width, min(max(int(height) + 10, 600), 6000))
    # Lazy images that the taller window reveals load now; wait for them before the picture.
    _wait(driver, "return [...document.images].every(i => i.complete)")
  driver.save_screenshot(str(path))
  driver.set_window_size(1400, 1000)


def test_prompt_page_in_browser(browser, run_dir, tmp_path):
  out, _, _ = run_dir
  _open(browser, out / "p1-a-clown-with-face-paint" / "index.html")
  _wait(browser, "return document.readyState === 'complete' && !!window.Plotly")
  # Three plotly graphs drawn; the 3D one has a WebGL canvas and a mesh3d trace.
  _wait(
    browser,
    """const gds = [...document.querySelectorAll('.js-plotly-plot')];
       return gds.length === 3 && gds.every(g => g._fullLayout && g._fullData);""",
  )
  mesh = browser.execute_script(
    """const gd = document.getElementById('mesh-view');
       const canvas = gd.querySelector('canvas');
       const scene = gd._fullLayout.scene._scene;
       return {type: gd._fullData[0].type, n: gd._fullData[0].x.length,
               colours: (gd._fullData[0].vertexcolor || []).length,
               canvas: !!canvas, w: canvas ? canvas.width : 0,
               gl: !!(scene && scene.glplot && scene.glplot.gl),
               noWebgl: !!gd.querySelector('.no-webgl')};"""
  )
  assert mesh["type"] == "mesh3d" and mesh["n"] > 9000 and mesh["colours"] == mesh["n"], mesh
  assert mesh["canvas"] and mesh["w"] > 0 and mesh["gl"] and not mesh["noWebgl"], mesh
  bars = browser.execute_script(
    "return document.getElementById('weights')._fullData.map(t => t.x.length)"
  )
  assert bars == [8, 4], "identity and expression weights"
  images = _images_decoded(browser)
  assert {i["src"] for i in images} == {"turntable.png", "evolution.gif", "texture.png"}
  assert all(i["w"] > 0 for i in images), images
  _check_logs(browser)
  shot = tmp_path / "prompt_page.png"
  _screenshot(browser, shot)
  assert shot.stat().st_size > 10_000
  if os.environ.get("SDSJAX_DOCS_SCREENSHOT") == "1":
    shutil.copy(shot, REPO / "docs" / "gallery_screenshot.png")


def test_xss_prompt_page_does_not_run_scripts(browser, run_dir):
  out, run, _ = run_dir
  folder = next(r["folder"] for r in run["prompts"] if r["prompt"] == XSS_PROMPT)
  _open(browser, out / folder / "index.html")
  _wait(browser, "return document.readyState === 'complete'")
  # A script in the prompt would have opened an alert (selenium raises on any open alert).
  assert browser.find_element("id", "prompt").text == XSS_PROMPT
  _wait(browser, "return !!document.getElementById('weights')._fullLayout")
  ticks = browser.execute_script(
    "return document.getElementById('weights')._fullData[0].x.slice(0, 1)"
  )
  assert ticks[0].startswith("&lt;/script&gt;")
  assert browser.execute_script("return document.querySelectorAll('img[src=x]').length") == 0
  _check_logs(browser)


def test_index_in_browser(browser, run_dir, tmp_path):
  _, run, index = run_dir
  _open(browser, index)
  _wait(browser, "return document.body.dataset.ready === '1'")
  cards = browser.execute_script(
    """return [...document.querySelectorAll('#grid .card')].map(c => ({
         index: +c.dataset.index, link: c.getAttribute('href'),
         text: c.querySelector('.prompt').textContent}))"""
  )
  assert [c["text"] for c in cards] == [r["prompt"] for r in run["prompts"]]
  assert [c["link"] is not None for c in cards] == [True, True, True, False, False]
  images = _images_decoded(browser)
  assert len(images) == 3 and all(i["w"] > 0 for i in images), images
  _check_logs(browser)
  _screenshot(browser, tmp_path / "index_small.png")
  # The search box filters.
  search = browser.find_element("id", "search")
  search.send_keys("clown")
  _wait(browser, "return document.querySelectorAll('#grid .card').length === 1")
  assert "clown" in browser.find_element("css selector", "#grid .card").text
  # A card leads to its page.
  browser.find_element("css selector", "#grid a.card").click()
  _wait(browser, "return location.href.endsWith('p1-a-clown-with-face-paint/index.html')")


def test_index_of_1000_prompts(browser, big_run, tmp_path):
  out, index = big_run
  assert index.stat().st_size < 400_000, "the index is a list, not 1000 embedded pages"
  _open(browser, index)
  _wait(browser, "return document.body.dataset.ready === '1'")

  def shown():
    return browser.execute_script(
      "return [...document.querySelectorAll('#grid .card')].map(c => +c.dataset.index)"
    )

  assert shown() == list(range(60)), "one page of 60 cards"
  assert "page 1 of 17" in browser.find_element("css selector", "nav.pager").text
  lazy = browser.execute_script("return [...document.images].map(i => i.getAttribute('loading'))")
  assert len(lazy) == 54 and set(lazy) == {"lazy"}, "pending prompts have no thumbnail"
  _check_logs(browser)
  _screenshot(browser, tmp_path / "index_1000.png")
  # Next page, then back to the index from a prompt page's link (#page=N).
  browser.find_elements("xpath", "//nav[@class='pager'][1]/button[text()='next ›']")[0].click()
  _wait(browser, "return document.querySelector('#grid .card').dataset.index === '60'")
  assert shown() == list(range(60, 120))
  _open(browser, out / "prompt-0130" / "index.html")
  browser.find_element("link text", "← all prompts").click()
  _wait(browser, "return document.body.dataset.ready === '1'")
  assert 130 in shown() and shown()[0] == 120
  # Search: all words must match, case-insensitively; the status filter narrows further.
  search = browser.find_element("id", "search")
  search.send_keys("Bearded VIKING")
  _wait(browser, "return document.getElementById('count').textContent.startsWith('16 of')")
  assert all(
    "bearded viking" in c
    for c in browser.execute_script(
      "return [...document.querySelectorAll('#grid .prompt')].map(e => e.textContent)"
    )
  )
  search.clear()
  search.send_keys("0999")
  _wait(browser, "return document.querySelectorAll('#grid .card').length === 1")
  assert shown() == [999]
  search.clear()
  search.send_keys(" ")  # clear() sends no input event; a space (trimmed) does
  from selenium.webdriver.support.select import Select

  Select(browser.find_element("id", "status")).select_by_value("pending")
  _wait(browser, "return document.getElementById('count').textContent.startsWith('100 of 1000')")
  assert shown()[:3] == [9, 19, 29]
