"""`python -m sdsjax.gallery OUT`: an HTML gallery of a run that opens offline from file://.

`write_gallery(out)` reads `OUT/run.json` and the per-prompt folders and writes

* `OUT/index.html`: every prompt as a card (the front view of its turntable, lazily loaded),
  with a search box, a status filter, sorting and pagination done by a small inline script
  over an inline JSON list (fetch() of local files is blocked under file://);
* `OUT/<folder>/index.html` for each prompt whose status is "done": the turntable, the
  evolution GIF, an interactive 3D view of `head.glb` (plotly `Mesh3d`, vertex colours sampled
  from the texture), loss and grad-norm curves, the final weights against ±1σ/±2σ of their
  N(0, 1) prior, and links to the files;
* `OUT/plotly.min.js` once: plotly.js as the plotly package ships it, so no page needs the
  network at view time and no third-party JS lives in this repository.

Pages are rebuilt only when their inputs changed (`OUT/.gallery.json` keeps a key per page),
so calling `write_gallery` after every wave of a 1000-prompt run stays cheap. Every file is
written through `export.atomic_write`: a crash never leaves a half-written page.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html
import json
import math
import os
import sys
import urllib.parse
from pathlib import Path

import numpy as np

from sdsjax import export
from sdsjax.errors import SdsjaxError
from sdsjax.run_folder import RUN_JSON

GALLERY_VERSION = 3  # bump when the page layout changes: every page is rebuilt
PAGE_NAME = "index.html"
PLOTLY_JS = "plotly.min.js"
CACHE_NAME = ".gallery.json"
INDEX_PAGE_SIZE = 60  # cards per index page by default (the page offers 30 to 240)
MAX_VIEW_FACES = 40_000  # larger meshes are decimated for the 3D view (payload and GPU)
MAX_CURVE_POINTS = 4000  # raw curve points per trace; the moving average uses every step
# Files a prompt page links to, in the order listed.
LINKED_FILES = (
  ("head.glb", "binary glTF mesh"),
  ("head.obj", "Wavefront OBJ mesh"),
  ("head.mtl", "OBJ material"),
  ("texture.png", "UV texture"),
  ("params.npz", "fitted parameters (numpy)"),
  ("metrics.jsonl", "per-step metrics"),
  ("turntable.png", "8 views, 45° apart"),
  ("evolution.gif", "the head across the run"),
)
UNTEXTURED_COLOUR = "#d9b49c"


class GalleryError(SdsjaxError):
  """A run folder the gallery cannot read (no run.json, or a malformed one)."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt of run.json."""

  index: int
  prompt: str
  slug: str
  seed: int | None
  wave: int | None
  status: str
  folder: str


# ---------------------------------------------------------------------------------------------
# Reading a run


def read_run(out: Path) -> tuple[dict, list[PromptRecord]]:
  """Reads `OUT/run.json`: (the whole document, its prompts in index order).

  Version 2 lists prompts as objects with a status. The older layout (a list of prompt
  strings plus `slugs`) is read too, each prompt "done" when its folder exists.
  """
  path = out / RUN_JSON
  try:
    run = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise GalleryError(f"{path} not found: point the gallery at a run's --out folder") from None
  except (OSError, ValueError) as e:
    raise GalleryError(f"cannot read {path}: {e}") from None
  prompts = run.get("prompts") if isinstance(run, dict) else None
  if not isinstance(prompts, list):
    raise GalleryError(f"{path} has no 'prompts' list")
  records = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):  # the layout before version 2
      slugs = run.get("slugs") or []
      slug = slugs[i] if i < len(slugs) else str(i)
      seeds = run.get("seeds") or []
      p = {
        "index": i,
        "prompt": p,
        "slug": slug,
        "seed": seeds[i] if i < len(seeds) else None,
        "status": "done" if (out / slug).is_dir() else "pending",
      }
    if not isinstance(p, dict) or not isinstance(p.get("prompt"), str):
      raise GalleryError(f"{path}: prompt {i} is not an object with a 'prompt' string")
    slug = str(p.get("slug") or i)
    folder = str(p.get("folder") or slug)
    parts = Path(folder).parts
    if Path(folder).is_absolute() or not parts or ".." in parts:
      raise GalleryError(f"{path}: prompt {i} has folder {folder!r}, not a folder inside the run")
    records.append(
      PromptRecord(
        index=int(p.get("index", i)),
        prompt=p["prompt"],
        slug=slug,
        seed=p.get("seed"),
        wave=p.get("wave"),
        status=str(p.get("status", "done")),
        folder=folder,
      )
    )
  records.sort(key=lambda r: r.index)
  return run, records


def read_metrics(path: Path) -> dict[str, np.ndarray]:
  """metrics.jsonl -> {field: (N,) float64} in step order; null and NaN read as NaN.

  Lines that do not parse (a line cut by a crash) are skipped.
  """
  rows = []
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
          rows.append(row)
  except FileNotFoundError:
    return {}
  rows.sort(key=lambda r: r["step"])
  fields = {k for r in rows for k, v in r.items() if v is None or isinstance(v, (int, float))}
  columns = {}
  for k in sorted(fields):
    values = [r.get(k) for r in rows]
    columns[k] = np.array([np.nan if v is None else float(v) for v in values], np.float64)
  return columns


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """(N,) -> (N,) trailing mean over `window` steps, NaNs left out (NaN where all are)."""
  finite = np.isfinite(values)
  total = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
  count = np.concatenate([[0], np.cumsum(finite)])
  hi = np.arange(1, len(values) + 1)
  lo = np.maximum(hi - window, 0)
  n = count[hi] - count[lo]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, (total[hi] - total[lo]) / np.maximum(n, 1), np.nan)


def _last_finite(values: np.ndarray) -> float | None:
  finite = values[np.isfinite(values)]
  return float(finite[-1]) if finite.size else None


def read_params(path: Path) -> dict[str, np.ndarray]:
  """params.npz as a dict (no pickles); empty when the file is missing or unreadable."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError):
    return {}


# ---------------------------------------------------------------------------------------------
# The 3D view


def sample_texture(texture: np.ndarray, uvs: np.ndarray) -> np.ndarray:
  """Bilinear texture lookup.

  Args:
    texture: (H, W, C) uint8 or float; row 0 is the top (v = 1).
    uvs: (N, 2) in [0, 1], v up (OBJ and sdsjax convention).

  Returns:
    (N, C) float64 in the texture's units.
  """
  tex = np.asarray(texture, np.float64)
  h, w = tex.shape[:2]
  uv = np.clip(np.nan_to_num(np.asarray(uvs, np.float64)), 0.0, 1.0)
  x = uv[:, 0] * (w - 1)
  y = (1.0 - uv[:, 1]) * (h - 1)
  x0 = np.floor(x).astype(np.int64).clip(0, w - 1)
  y0 = np.floor(y).astype(np.int64).clip(0, h - 1)
  x1 = np.minimum(x0 + 1, w - 1)
  y1 = np.minimum(y0 + 1, h - 1)
  fx = (x - x0)[:, None]
  fy = (y - y0)[:, None]
  top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
  bottom = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
  return top * (1 - fy) + bottom * fy


def decimate(vertices: np.ndarray, faces: np.ndarray, colours, max_faces: int):
  """Vertex clustering on a grid, coarsened until at most `max_faces` faces remain.

  Args:
    vertices: (V, 3) float. faces: (F, 3) int. colours: (V, 3) uint8 or None.
    max_faces: the face budget.

  Returns:
    (vertices (V', 3), faces (F', 3), colours (V', 3) or None); unchanged when F ≤ max_faces.
  """
  if len(faces) <= max_faces:
    return vertices, faces, colours
  lo, hi = vertices.min(0), vertices.max(0)
  extent = float(np.max(hi - lo)) or 1.0
  cells = 512
  while True:
    cell = np.floor((vertices - lo) / extent * (cells - 1e-6)).astype(np.int64)
    key = (cell[:, 0] * cells + cell[:, 1]) * cells + cell[:, 2]
    _, cluster = np.unique(key, return_inverse=True)
    cluster = cluster.reshape(-1)
    new_faces = cluster[faces]
    keep = (
      (new_faces[:, 0] != new_faces[:, 1])
      & (new_faces[:, 1] != new_faces[:, 2])
      & (new_faces[:, 0] != new_faces[:, 2])
    )
    new_faces = new_faces[keep]
    # A face and its rotations are one face; keep the first, orientation intact.
    _, first = np.unique(np.sort(new_faces, axis=1), axis=0, return_index=True)
    new_faces = new_faces[np.sort(first)]
    if len(new_faces) <= max_faces or cells <= 8:
      break
    cells = int(cells * 0.8)
  counts = np.bincount(cluster).astype(np.float64)[:, None]
  new_vertices = np.stack(
    [np.bincount(cluster, weights=vertices[:, c]) for c in range(3)], -1
  ) / np.maximum(counts, 1)
  new_colours = None
  if colours is not None:
    summed = np.stack(
      [np.bincount(cluster, weights=colours[:, c].astype(np.float64)) for c in range(3)], -1
    )
    new_colours = np.round(summed / np.maximum(counts, 1)).astype(np.uint8)
  return new_vertices, new_faces, new_colours


def load_view_mesh(path: Path, max_faces: int = MAX_VIEW_FACES):
  """Reads head.glb for the 3D view.

  Returns:
    (vertices (V, 3) float32, faces (F, 3) int32, colours (V, 3) uint8 or None when the mesh
    has no texture), decimated to at most `max_faces` faces.
  """
  import trimesh  # Heavy import, only needed here.

  mesh = trimesh.load(path, file_type="glb", force="mesh", process=False)
  vertices = np.asarray(mesh.vertices, np.float64)
  faces = np.asarray(mesh.faces, np.int64)
  colours = None
  visual = mesh.visual
  uv = getattr(visual, "uv", None)
  material = getattr(visual, "material", None)
  image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
  if uv is not None and image is not None and len(uv) == len(vertices):
    texture = np.asarray(image.convert("RGB"))
    colours = np.clip(np.round(sample_texture(texture, uv)), 0, 255).astype(np.uint8)
  vertices, faces, colours = decimate(vertices, faces, colours, max_faces)
  return vertices.astype(np.float32), faces.astype(np.int32), colours


# ---------------------------------------------------------------------------------------------
# Figures (plotly)

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_FONT = {"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 13}


def _figure_html(fig, div_id: str) -> str:
  import plotly.io as pio

  return pio.to_html(
    fig, full_html=False, include_plotlyjs=False, config=_PLOT_CONFIG, div_id=div_id
  )


def mesh_figure(vertices: np.ndarray, faces: np.ndarray, colours):
  """plotly Mesh3d of a head (+y up, facing +z), seen from the front and a little above.

  plotly's turntable drag keeps its z axis up, so the head's (x, y, z) is shown as plotly's
  (x, −z, y): a proper rotation (faces keep their orientation) that makes "up" the head's up.
  """
  import plotly.graph_objects as go

  mesh = {
    "x": vertices[:, 0],
    "y": -vertices[:, 2],
    "z": vertices[:, 1],
    "i": faces[:, 0],
    "j": faces[:, 1],
    "k": faces[:, 2],
    "flatshading": False,
    "hoverinfo": "skip",
    "lighting": {"ambient": 0.45, "diffuse": 0.8, "specular": 0.15, "roughness": 0.8},
    "lightposition": {"x": 100, "y": 200, "z": 300},
  }
  if colours is None:
    mesh["color"] = UNTEXTURED_COLOUR
  else:
    mesh["vertexcolor"] = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colours.tolist()]
  hidden = {"visible": False}
  fig = go.Figure(go.Mesh3d(**mesh))
  fig.update_layout(
    template="simple_white",
    font=_FONT,
    height=560,
    margin={"l": 0, "r": 0, "t": 0, "b": 0},
    scene={
      "xaxis": hidden,
      "yaxis": hidden,
      "zaxis": hidden,
      "aspectmode": "data",
      "camera": {"up": {"x": 0, "y": 0, "z": 1}, "eye": {"x": 0.7, "y": -1.9, "z": 0.35}},
      "dragmode": "turntable",
    },
    paper_bgcolor="#f4f4f2",
  )
  return fig


def _log_ticks(lo: float, hi: float) -> list[float]:
  """1-2-5 ticks covering [lo, hi] (plotly's own log ticks label 20 as "2")."""
  ticks = [
    m * 10.0**e
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for m in (1, 2, 5)
  ]
  inside = [t for t in ticks if lo <= t <= hi]
  return inside if len(inside) >= 2 else ticks


def curves_figure(metrics: dict[str, np.ndarray]):
  """Loss and grad norm per step: raw (faint, strided to MAX_CURVE_POINTS) and smoothed."""
  import plotly.graph_objects as go
  from plotly.subplots import make_subplots

  steps = metrics["step"]
  n = len(steps)
  window = max(1, n // 50)
  stride = max(1, math.ceil(n / MAX_CURVE_POINTS))
  rows = [k for k in ("loss", "grad_norm") if k in metrics]
  titles = {"loss": "loss ‖ε̂ − ε‖²", "grad_norm": "gradient norm (before clipping)"}
  fig = make_subplots(
    rows=len(rows),
    cols=1,
    shared_xaxes=True,
    vertical_spacing=0.12,
    subplot_titles=[titles[k] for k in rows],
  )
  colours = {"loss": "#3b6fb6", "grad_norm": "#c0622b"}

  def points(values):  # NaN -> None: plotly leaves a gap
    return [None if not math.isfinite(v) else v for v in values.tolist()]

  for row, key in enumerate(rows, start=1):
    values = metrics[key]
    fig.add_trace(
      go.Scatter(
        x=steps[::stride],
        y=points(values[::stride]),
        mode="lines",
        name=f"{key} (raw)",
        line={"color": colours[key], "width": 1},
        opacity=0.3,
      ),
      row=row,
      col=1,
    )
    smooth = moving_average(values, window)
    fig.add_trace(
      go.Scatter(
        x=steps[::stride],
        y=points(smooth[::stride]),
        mode="lines",
        name=f"{key} ({window}-step mean)",
        line={"color": colours[key], "width": 2.5},
      ),
      row=row,
      col=1,
    )
    positive = values[np.isfinite(values)]
    if key == "grad_norm" and positive.size and np.all(positive > 0):
      ticks = _log_ticks(float(positive.min()), float(positive.max()))
      fig.update_yaxes(
        type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks], row=row, col=1
      )
  if "finite" in metrics and "loss" in metrics:
    skipped = np.isfinite(metrics["finite"]) & (metrics["finite"] == 0)
    if np.any(skipped):
      finite_loss = metrics["loss"][np.isfinite(metrics["loss"])]
      floor = float(finite_loss.min()) if finite_loss.size else 0.0
      fig.add_trace(
        go.Scatter(
          x=steps[skipped],
          y=np.full(int(skipped.sum()), floor),
          mode="markers",
          name="skipped step (non-finite)",
          marker={"symbol": "x", "color": "#c62828", "size": 7},
        ),
        row=1,
        col=1,
      )
  fig.update_xaxes(title_text="step", row=len(rows), col=1)
  fig.update_layout(
    template="simple_white",
    font=_FONT,
    height=260 * len(rows) + 60,
    margin={"l": 60, "r": 20, "t": 40, "b": 50},
    legend={"orientation": "h", "y": -0.15},
    hovermode="x unified",
  )
  return fig


def _bar_colours(values: np.ndarray) -> list[str]:
  return [
    "#c62828" if abs(v) > 2 else "#ef8a17" if abs(v) > 1 else "#3b6fb6" for v in values.tolist()
  ]


_WEIGHTS_ROW_PX = 360


def weights_figure(groups: list[tuple[str, np.ndarray, list[str]]]):
  """Bar charts of final weights, one row per (title, values (K,), names) group, against
  bands at ±1σ and ±2σ of their N(0, 1) prior."""
  import plotly.graph_objects as go
  from plotly.subplots import make_subplots

  fig = make_subplots(
    rows=len(groups),
    cols=1,
    # Room between rows for the slanted names (~150 px) and the next row's title, as a
    # fraction of the plotting height (the figure less its 140 px of margins).
    vertical_spacing=min(0.9 / len(groups), 190 / (_WEIGHTS_ROW_PX * len(groups) - 140)),
    subplot_titles=[g[0] for g in groups],
  )
  shapes, notes = [], []
  for row, (title, values, names) in enumerate(groups, start=1):
    values = np.asarray(values, np.float64).reshape(-1)
    # plotly reads a few HTML tags in labels; names come from model files, so escape them.
    labels = [html.escape(n) if n else f"{title[0]}{k}" for k, n in enumerate(names)]
    fig.add_trace(
      go.Bar(
        x=labels,
        y=values,
        marker_color=_bar_colours(values),
        name=title,
        hovertemplate="%{x}: %{y:.3f}<extra></extra>",
        showlegend=False,
      ),
      row=row,
      col=1,
    )
    top = max(2.5, 1.1 * float(np.max(np.abs(values), initial=0.0)))
    fig.update_yaxes(range=[-top, top], title_text="weight / σ", row=row, col=1)
    fig.update_xaxes(tickangle=-60, row=row, col=1)
    # The bands as plain layout shapes: plotly's add_hrect/add_hline cost ~20 ms each.
    axes = {"xref": f"x{'' if row == 1 else row} domain", "yref": f"y{'' if row == 1 else row}"}
    for sigma, shade in ((2, 0.06), (1, 0.1)):
      shapes.append(
        {"type": "rect", "x0": 0, "x1": 1, "y0": -sigma, "y1": sigma, "line_width": 0, **axes}
        | {"fillcolor": "#3b6fb6", "opacity": shade}
      )
      for sign in (1, -1):
        y = sign * sigma
        dotted = {"dash": "dot", "width": 1, "color": "#888"}
        shapes.append({"type": "line", "x0": 0, "x1": 1, "y0": y, "y1": y, "line": dotted, **axes})
        notes.append(
          {"x": 1, "y": y, "xanchor": "left", "showarrow": False, "font": {"size": 11}, **axes}
          | {"text": f"{'+' if sign > 0 else '−'}{sigma}σ"}
        )
  fig.update_layout(
    shapes=shapes,
    annotations=[*fig.layout.annotations, *notes],
    template="simple_white",
    font=_FONT,
    height=_WEIGHTS_ROW_PX * len(groups),
    margin={"l": 60, "r": 40, "t": 40, "b": 100},
    bargap=0.15,
  )
  return fig


# ---------------------------------------------------------------------------------------------
# Pages

_STYLE = """
:root { --fg: #1d1d1f; --muted: #6b6b70; --bg: #fafaf8; --card: #fff; --line: #e2e2de;
  --accent: #3b6fb6; --done: #2e7d32; --pending: #8a6d00; --failed: #c62828; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: var(--bg); }
header, main, footer, nav.pager, .controls, section { max-width: 1400px; margin: 0 auto;
  padding: 0 20px; }
header { padding-top: 18px; }
h1 { font-size: 1.5rem; margin: 0.2em 0; overflow-wrap: anywhere; }
h2 { font-size: 1.1rem; margin: 1.4em 0 0.5em; }
a { color: var(--accent); }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 0.78rem;
  color: #fff; background: var(--muted); vertical-align: middle; }
.badge.done { background: var(--done); } .badge.pending { background: var(--pending); }
.badge.failed { background: var(--failed); }
.controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin: 14px auto; }
.controls input[type=search] { flex: 1 1 320px; font-size: 1rem; padding: 7px 10px;
  border: 1px solid var(--line); border-radius: 6px; }
.controls select { font-size: 0.95rem; padding: 5px; }
nav.pager { display: flex; gap: 6px; align-items: center; margin: 10px auto; }
nav.pager button { font-size: 0.95rem; padding: 4px 11px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 14px; }
.card { display: block; background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; overflow: hidden; color: inherit; text-decoration: none; }
a.card:hover { border-color: var(--accent); box-shadow: 0 2px 8px rgba(0,0,0,.08); }
.thumb { aspect-ratio: 1; overflow: hidden; background: #eeeeea; position: relative; }
/* The turntable is 2 rows x 4 views; show the first (front) view only. */
.thumb img { width: 400%; height: 200%; display: block; }
.thumb .placeholder { position: absolute; inset: 0; display: grid; place-items: center;
  color: var(--muted); font-size: 0.9rem; }
.caption { padding: 7px 9px 9px; font-size: 0.88rem; }
.caption .prompt { overflow-wrap: anywhere; }
.caption .meta { color: var(--muted); font-size: 0.78rem; margin-top: 3px; }
.pictures { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.pictures figure { margin: 0; }
.pictures img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px;
  background: #fff; }
figcaption { color: var(--muted); font-size: 0.85rem; }
.files li { margin: 2px 0; }
table.pose { border-collapse: collapse; font-size: 0.9rem; }
table.pose td, table.pose th { border-bottom: 1px solid var(--line); padding: 3px 10px;
  text-align: right; }
.plot { background: #fff; border: 1px solid var(--line); border-radius: 6px; }
footer { color: var(--muted); font-size: 0.85rem; padding: 30px 20px; }
pre { white-space: pre-wrap; font-size: 0.8rem; background: #fff; padding: 10px;
  border: 1px solid var(--line); border-radius: 6px; }
"""

_INDEX_SCRIPT = r"""
(function () {
  "use strict";
  var entries = JSON.parse(document.getElementById("prompt-data").textContent);
  var grid = document.getElementById("grid");
  var search = document.getElementById("search");
  var statusSel = document.getElementById("status");
  var sortSel = document.getElementById("sort");
  var sizeSel = document.getElementById("page-size");
  var count = document.getElementById("count");
  var pagers = document.querySelectorAll("nav.pager");
  var state = {q: "", status: "all", sort: "index", size: DEFAULT_SIZE, page: 1};
  entries.forEach(function (e) {
    e.hay = (e.prompt + " " + e.slug + " #" + e.index).toLowerCase();
  });

  function readHash() {
    var h = new URLSearchParams(location.hash.slice(1));
    state.q = h.get("q") || "";
    state.status = h.get("status") || "all";
    state.sort = h.get("sort") || "index";
    state.size = parseInt(h.get("size"), 10) || DEFAULT_SIZE;
    state.page = Math.max(1, parseInt(h.get("page"), 10) || 1);
    search.value = state.q;
    statusSel.value = state.status;
    sortSel.value = state.sort;
    sizeSel.value = String(state.size);
  }

  function writeHash() {
    var h = new URLSearchParams();
    if (state.q) h.set("q", state.q);
    if (state.status !== "all") h.set("status", state.status);
    if (state.sort !== "index") h.set("sort", state.sort);
    if (state.size !== DEFAULT_SIZE) h.set("size", String(state.size));
    if (state.page > 1) h.set("page", String(state.page));
    var hash = h.toString();
    var url = location.href.split("#")[0] + (hash ? "#" + hash : "");
    try { history.replaceState(null, "", url); } catch (err) { location.replace(url); }
  }

  function selected() {
    var words = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    var list = entries.filter(function (e) {
      if (state.status !== "all" && e.status !== state.status) return false;
      return words.every(function (w) { return e.hay.indexOf(w) >= 0; });
    });
    if (state.sort === "loss") {
      list.sort(function (a, b) {
        var x = a.loss === null ? Infinity : a.loss, y = b.loss === null ? Infinity : b.loss;
        return x - y || a.index - b.index;
      });
    }
    return list;
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function card(e) {
    var node = el(e.page ? "a" : "div", "card");
    if (e.page) node.href = e.page;
    node.dataset.index = String(e.index);
    var thumb = el("div", "thumb");
    if (e.thumb) {
      var img = document.createElement("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = "front view";
      img.src = e.thumb;
      thumb.appendChild(img);
    } else {
      thumb.appendChild(el("div", "placeholder", e.status));
    }
    node.appendChild(thumb);
    var caption = el("div", "caption");
    caption.appendChild(el("div", "prompt", e.prompt));
    var meta = el("div", "meta");
    meta.appendChild(el("span", "badge " + e.status, e.status));
    var bits = ["#" + e.index];
    if (e.seed !== null) bits.push("seed " + e.seed);
    if (e.loss !== null) bits.push("loss " + e.loss.toPrecision(3));
    meta.appendChild(document.createTextNode(" " + bits.join(" · ")));
    caption.appendChild(meta);
    node.appendChild(caption);
    return node;
  }

  function button(label, page, disabled) {
    var b = el("button", "", label);
    b.type = "button";
    b.disabled = disabled;
    b.addEventListener("click", function () {
      state.page = page; render(); window.scrollTo(0, 0);
    });
    return b;
  }

  function render() {
    var list = selected();
    var pages = Math.max(1, Math.ceil(list.length / state.size));
    state.page = Math.min(state.page, pages);
    var start = (state.page - 1) * state.size;
    var shown = list.slice(start, start + state.size);
    var frag = document.createDocumentFragment();
    shown.forEach(function (e) { frag.appendChild(card(e)); });
    grid.replaceChildren(frag);
    count.textContent = list.length + " of " + entries.length + " prompts";
    pagers.forEach(function (nav) {
      nav.replaceChildren(
        button("« first", 1, state.page === 1),
        button("‹ prev", state.page - 1, state.page === 1),
        el("span", "muted", "page " + state.page + " of " + pages),
        button("next ›", state.page + 1, state.page === pages),
        button("last »", pages, state.page === pages));
    });
    writeHash();
  }

  var timer = null;
  search.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(function () {
      state.q = search.value.trim(); state.page = 1; render();
    }, 120);
  });
  statusSel.addEventListener("change", function () {
    state.status = statusSel.value; state.page = 1; render();
  });
  sortSel.addEventListener("change", function () { state.sort = sortSel.value; render(); });
  sizeSel.addEventListener("change", function () {
    state.size = parseInt(sizeSel.value, 10); state.page = 1; render();
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "/" && document.activeElement !== search) {
      ev.preventDefault(); search.focus();
    }
  });
  window.addEventListener("hashchange", function () { readHash(); render(); });
  readHash();
  render();
  document.body.dataset.ready = "1";
})();
"""


def _e(text) -> str:
  return html.escape(str(text), quote=True)


def _url(*parts: str) -> str:
  """A relative URL from path parts, each percent-encoded ('/' kept inside a part)."""
  return "/".join(urllib.parse.quote(p) for p in parts)


def _json_for_script(data) -> str:
  """JSON that cannot end its <script> element or open a comment."""
  text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
  return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _document(title: str, body: str, head_extra: str = "") -> str:
  return (
    "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<meta name="generator" content="sdsjax.gallery">\n'
    f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n{head_extra}</head>\n"
    f"<body>\n{body}\n</body>\n</html>\n"
  )


def _human_size(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def _prompt_body(
  record: PromptRecord,
  folder: Path,
  metrics: dict[str, np.ndarray],
  params: dict[str, np.ndarray],
  nav: dict[str, str | None],
) -> str:
  """The <body> of one prompt's page."""
  parts = []
  links = [f'<a href="{_e(nav["index"])}">← all prompts</a>']
  if nav["prev"]:
    links.append(f'<a href="{_e(nav["prev"])}" rel="prev">‹ previous</a>')
  if nav["next"]:
    links.append(f'<a href="{_e(nav["next"])}" rel="next">next ›</a>')
  parts.append(f"<header><nav>{' · '.join(links)}</nav>")
  parts.append(f'<h1 id="prompt">{_e(record.prompt)}</h1>')
  meta = [f"#{record.index}", f"folder {_e(record.folder)}"]
  if record.seed is not None:
    meta.append(f"seed {_e(record.seed)}")
  if record.wave is not None:
    meta.append(f"wave {_e(record.wave)}")
  if "step" in metrics and len(metrics["step"]):
    meta.append(f"{int(np.nanmax(metrics['step']))} steps")
    loss = metrics.get("loss")
    if loss is not None:
      final = _last_finite(moving_average(loss, max(1, len(loss) // 50)))
      if final is not None:
        meta.append(f"final loss {final:.4g} (smoothed)")
    finite = metrics.get("finite")
    if finite is not None:
      skipped = int(np.sum(np.isfinite(finite) & (finite == 0)))
      meta.append(f"{skipped} skipped step{'s' * (skipped != 1)}")
  parts.append(f'<p class="muted">{" · ".join(meta)}</p></header>')

  pictures = []
  for name, caption, alt in (
    ("turntable.png", "turntable: 8 views, 45° apart", "turntable"),
    ("evolution.gif", "evolution across the run", "evolution"),
    ("texture.png", "UV texture", "texture"),
  ):
    if (folder / name).is_file():
      width = ' width="320"' if name == "texture.png" else ""
      pictures.append(
        f'<figure><img src="{_url(name)}" alt="{alt}"{width}>'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
      )
  if pictures:
    parts.append(f'<section class="pictures">{"".join(pictures)}</section>')

  parts.append("<section><h2>3D view</h2>")
  glb = folder / "head.glb"
  if glb.is_file():
    vertices, faces, colours = load_view_mesh(glb)
    parts.append(
      f'<p class="muted">head.glb: {len(vertices)} vertices, {len(faces)} faces'
      f"{', vertex colours from the texture' if colours is not None else ''}. "
      "Drag to turn, scroll to zoom.</p>"
    )
    fig = mesh_figure(vertices, faces, colours)
    parts.append(f'<div class="plot">{_figure_html(fig, "mesh-view")}</div>')
  else:
    parts.append('<p class="muted">head.glb is missing.</p>')
  parts.append("</section>")

  parts.append("<section><h2>Training curves</h2>")
  if (
    metrics.get("step") is not None
    and len(metrics["step"])
    and ("loss" in metrics or "grad_norm" in metrics)
  ):
    parts.append(f'<div class="plot">{_figure_html(curves_figure(metrics), "curves")}</div>')
  else:
    parts.append('<p class="muted">metrics.jsonl is missing or empty.</p>')
  parts.append("</section>")

  groups = []
  if "weights" in params:
    weights = np.asarray(params["weights"], np.float64).reshape(-1)
    names = [str(n) for n in params.get("names", [""] * len(weights))]
    groups.append(("identity weights", weights, names))
  if "expression" in params and np.asarray(params["expression"]).size:
    expression = np.asarray(params["expression"], np.float64).reshape(-1)
    names = [str(n) for n in params.get("expression_names", [""] * len(expression))]
    groups.append(("expression weights", expression, names))
  parts.append("<section><h2>Final weights</h2>")
  if groups:
    parts.append(
      '<p class="muted">Each weight in units of its prior σ (weights ~ N(0, 1)); '
      "shaded bands: ±1σ and ±2σ; orange past 1σ, red past 2σ.</p>"
    )
    parts.append(f'<div class="plot">{_figure_html(weights_figure(groups), "weights")}</div>')
  else:
    parts.append('<p class="muted">params.npz is missing or has no weights.</p>')
  if "pose" in params:
    pose = np.degrees(np.asarray(params["pose"], np.float64).reshape(-1, 3))
    joints = [str(n) for n in params.get("joint_names", [f"joint {j}" for j in range(len(pose))])]
    rows = "".join(
      f"<tr><th>{_e(j)}</th>{''.join(f'<td>{v:.1f}°</td>' for v in p)}</tr>"
      for j, p in zip(joints, pose)
    )
    parts.append(
      '<h2>Pose (axis-angle, degrees)</h2><table class="pose"><tr><th>joint</th>'
      f"<th>x</th><th>y</th><th>z</th></tr>{rows}</table>"
    )
  parts.append("</section>")

  files = []
  for name, what in LINKED_FILES:
    path = folder / name
    if path.is_file():
      files.append(
        f'<li><a href="{_url(name)}">{_e(name)}</a> '
        f'<span class="muted">{_e(what)}, {_human_size(path.stat().st_size)}</span></li>'
      )
  parts.append(f'<section><h2>Files</h2><ul class="files">{"".join(files)}</ul></section>')
  parts.append(
    "<footer>Written by sdsjax.gallery; plotly.js loads from the run folder, "
    "no network needed.</footer>"
  )
  return "\n".join(parts)


def _page_inputs(folder: Path) -> list:
  """(name, size, mtime) of the files a prompt page reads or links: its rebuild key."""
  names = sorted({name for name, _ in LINKED_FILES})
  stats = []
  for name in names:
    try:
      st = (folder / name).stat()
    except FileNotFoundError:
      continue
    stats.append([name, st.st_size, st.st_mtime_ns])
  return stats


def _summary(metrics: dict[str, np.ndarray]) -> dict:
  """What the index shows of a prompt's metrics."""
  loss = metrics.get("loss")
  steps = metrics.get("step")
  final = None
  if loss is not None and len(loss):
    final = _last_finite(moving_average(loss, max(1, len(loss) // 50)))
  return {
    "loss": final,
    "steps": int(np.nanmax(steps)) if steps is not None and len(steps) else None,
  }


def _write_text(path: Path, text: str) -> None:
  with export.atomic_write(path) as f:
    f.write(text.encode("utf-8"))


def _write_plotly_js(out: Path, cache: dict) -> None:
  import plotly
  from plotly.offline import get_plotlyjs

  path = out / PLOTLY_JS
  if path.is_file() and cache.get("plotly") == plotly.__version__:
    return
  _write_text(path, get_plotlyjs())
  cache["plotly"] = plotly.__version__


def _read_cache(out: Path) -> dict:
  try:
    cache = json.loads((out / CACHE_NAME).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return {"version": GALLERY_VERSION, "pages": {}}
  if not isinstance(cache, dict) or cache.get("version") != GALLERY_VERSION:
    return {"version": GALLERY_VERSION, "pages": {}}
  cache.setdefault("pages", {})
  return cache


def _index_body(run: dict, records: list[PromptRecord], summaries: dict, built: set) -> str:
  counts = {}
  for r in records:
    counts[r.status] = counts.get(r.status, 0) + 1
  config = run.get("config") if isinstance(run.get("config"), dict) else {}
  facts = [f"{len(records)} prompts"] + [f"{n} {s}" for s, n in sorted(counts.items())]
  for key, label in (
    ("steps", "steps"),
    ("num_components", "components"),
    ("num_expressions", "expressions"),
  ):
    if key in config:
      facts.append(f"{_e(config[key])} {label}")
  entries = []
  for r in records:
    page = r.folder in built
    summary = summaries.get(r.folder, {}) if page else {}
    entries.append(
      {
        "index": r.index,
        "prompt": r.prompt,
        "slug": r.slug,
        "seed": r.seed,
        "status": r.status,
        "page": _url(*Path(r.folder).parts, PAGE_NAME) if page else None,
        "thumb": _url(*Path(r.folder).parts, "turntable.png")
        if page and summary.get("thumb")
        else None,
        "loss": summary.get("loss"),
      }
    )
  statuses = ["all", *sorted(counts)]
  status_options = "".join(f'<option value="{_e(s)}">{_e(s)}</option>' for s in statuses)
  size_options = "".join(
    f'<option value="{n}"{" selected" if n == INDEX_PAGE_SIZE else ""}>{n} per page</option>'
    for n in (30, 60, 120, 240)
  )
  script = _INDEX_SCRIPT.replace("DEFAULT_SIZE", str(INDEX_PAGE_SIZE))
  config_text = _e(json.dumps(config, indent=2, sort_keys=True)) if config else ""
  return "\n".join(
    [
      "<header><h1>sdsjax gallery</h1>",
      f'<p class="muted" id="summary">{" · ".join(facts)}</p></header>',
      '<div class="controls">',
      '<input id="search" type="search" placeholder="Search prompts (press /)" '
      'aria-label="Search prompts" autocomplete="off">',
      f'<select id="status" aria-label="Status">{status_options}</select>',
      '<select id="sort" aria-label="Sort"><option value="index">by index</option>'
      '<option value="loss">by final loss</option></select>',
      f'<select id="page-size" aria-label="Page size">{size_options}</select>',
      '<span id="count" class="muted"></span></div>',
      '<nav class="pager" aria-label="pages"></nav>',
      '<main id="grid" class="grid"></main>',
      '<nav class="pager" aria-label="pages"></nav>',
      "<noscript><p>The gallery needs JavaScript to list its prompts; each prompt's page is "
      "<code>FOLDER/index.html</code>.</p></noscript>",
      (
        "<section><details><summary>Run configuration</summary>"
        f"<pre>{config_text}</pre></details></section>"
        if config
        else ""
      ),
      "<footer>Written by sdsjax.gallery. Open any card for its 3D view, curves and files."
      "</footer>",
      f'<script type="application/json" id="prompt-data">{_json_for_script(entries)}</script>',
      f"<script>{script}</script>",
    ]
  )


def write_gallery(out: str | os.PathLike) -> Path:
  """Writes (or refreshes) the gallery of the run in `out`.

  Reads `out/run.json` and each "done" prompt's folder. Pages whose inputs are unchanged since
  the last call are kept as they are.

  Returns:
    The path of `out/index.html`.
  """
  out = Path(out)
  run, records = read_run(out)
  cache = _read_cache(out)
  _write_plotly_js(out, cache)
  pages_cache = cache["pages"]
  done = [r for r in records if r.status == "done" and (out / r.folder).is_dir()]
  position = {r.index: k for k, r in enumerate(records)}
  summaries, built = {}, set()
  for k, record in enumerate(done):
    folder = out / record.folder
    page = folder / PAGE_NAME
    root = os.path.relpath(out, folder)

    def rel(target: Path, root=root) -> str:
      return _url(*Path(root).parts, *target.parts)

    nav = {
      "index": rel(Path(PAGE_NAME)) + f"#page={position[record.index] // INDEX_PAGE_SIZE + 1}",
      "prev": rel(Path(done[k - 1].folder, PAGE_NAME)) if k > 0 else None,
      "next": rel(Path(done[k + 1].folder, PAGE_NAME)) if k + 1 < len(done) else None,
    }
    key_data = [GALLERY_VERSION, dataclasses.asdict(record), nav, _page_inputs(folder)]
    key = hashlib.sha1(json.dumps(key_data, sort_keys=True).encode()).hexdigest()
    cached = pages_cache.get(record.folder)
    if not (cached and cached.get("key") == key and page.is_file()):
      metrics = read_metrics(folder / "metrics.jsonl")
      params = read_params(folder / "params.npz")
      body = _prompt_body(record, folder, metrics, params, nav)
      head = f'<script src="{_e(rel(Path(PLOTLY_JS)))}" charset="utf-8"></script>\n'
      _write_text(page, _document(f"{record.prompt} · sdsjax", body, head))
      cached = {"key": key, **_summary(metrics), "thumb": (folder / "turntable.png").is_file()}
      pages_cache[record.folder] = cached
    summaries[record.folder] = cached
    built.add(record.folder)
  index = out / PAGE_NAME
  _write_text(index, _document("sdsjax gallery", _index_body(run, records, summaries, built)))
  with export.atomic_write(out / CACHE_NAME) as f:
    f.write(json.dumps(cache).encode("utf-8"))
  return index


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m sdsjax.gallery",
    description="Write (or refresh) OUT/index.html, the HTML gallery of a run.",
  )
  parser.add_argument("out", help="a run's --out folder (with run.json)")
  args = parser.parse_args(argv)
  try:
    index = write_gallery(args.out)
  except SdsjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(index.resolve().as_uri())
  return 0


if __name__ == "__main__":
  sys.exit(main())
