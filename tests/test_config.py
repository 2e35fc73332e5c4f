"""Config loading: YAML files in configs/, overrides, and one-line errors for bad input."""

import dataclasses
import json
from pathlib import Path

import pytest

from sdsjax import config as config_lib
from sdsjax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_every_shipped_config_is_tested():
  assert {"default.yaml", "tiny.yaml", "texture.yaml", "sd21.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_round_trip(name):
  cfg = config_lib.load_config(CONFIGS / name)
  data = config_lib.to_dict(cfg)
  json.dumps(data)  # plain data: JSON and YAML serialisable
  again = config_lib.load_config(None, [data])
  assert again == cfg
  assert config_lib.to_dict(again) == data


def test_default_yaml_only_names_the_model():
  """Each default lives in FitConfig: default.yaml repeats none of them."""
  cfg = config_lib.load_config(CONFIGS / "default.yaml")
  assert cfg == config_lib.FitConfig()
  assert cfg.guidance_scale == 100.0 and cfg.t_range == (0.02, 0.98)
  assert cfg.sd_resolution == 512 and cfg.weighting == "sds"


def test_sections_are_the_library_dataclasses():
  from sdsjax import camera
  from sdsjax import raster

  cfg = config_lib.FitConfig()
  assert isinstance(cfg.camera, camera.CameraRanges)
  assert isinstance(cfg.light, camera.LightSettings)
  settings = config_lib.raster_settings(cfg, 64)
  assert isinstance(settings, raster.RasterSettings) and settings.image_size == 64
  # Defaults come from the library: one place each.
  assert cfg.camera == camera.CameraRanges()
  assert dataclasses.asdict(cfg.raster) == {
    k: v for k, v in dataclasses.asdict(raster.RasterSettings()).items() if k != "image_size"
  }


@pytest.mark.parametrize(
  "override, check",
  [
    ("guidance_scale=7.5", lambda c: c.guidance_scale == 7.5),
    ("raster.sigma=1e-5", lambda c: c.raster.sigma == 1e-5),
    ("raster.faces_per_pixel=4", lambda c: c.raster.faces_per_pixel == 4),
    ("camera.elevation_range=[0, 30]", lambda c: c.camera.elevation_range == (0.0, 30.0)),
    ("camera.azimuth_spread=45", lambda c: c.camera.azimuth_spread == 45.0),
    ("light.ambient=0.2", lambda c: c.light.ambient == 0.2),
    ("light.ambient_only_steps=5", lambda c: c.light.ambient_only_steps == 5),
    ("prior.identity=0.3", lambda c: c.prior.identity == 0.3),
    ("prior.fold=0", lambda c: c.prior.fold == 0.0),
    ("texture=true", lambda c: c.texture is True),
    ("pose_joints=[jaw]", lambda c: c.pose_joints == ("jaw",)),
    ("prompts_per_device=8", lambda c: c.prompts_per_device == 8),
    ("prompts_per_device=auto", lambda c: c.prompts_per_device == "auto"),
    # Strings stay strings: a number is a valid prompt.
    ("negative_prompt=1.5", lambda c: c.negative_prompt == "1.5"),
    ("negative_prompt=yes", lambda c: c.negative_prompt == "yes"),
    ("lr=1e-3", lambda c: c.lr == 1e-3),
  ],
)
def test_dotted_overrides_reach_every_section(override, check):
  cfg = config_lib.load_config(CONFIGS / "tiny.yaml", [override])
  assert check(cfg), override


def test_overrides_apply_in_order_and_mappings_work():
  cfg = config_lib.load_config(None, ["steps=3", {"steps": 5, "camera": {"back_view_prob": 0}}])
  assert cfg.steps == 5 and cfg.camera.back_view_prob == 0.0


@pytest.mark.parametrize(
  "override, words",
  [
    ("guidance=3", "unknown config key 'guidance' (did you mean 'guidance_scale'?)"),
    ("guidance_scal=3", "did you mean 'guidance_scale'"),
    ("raster.sigmaa=1", "unknown config key 'raster.sigmaa' (did you mean 'raster.sigma'?)"),
    ("camera.elevation=[0, 1]", "unknown config key 'camera.elevation'"),
    ("steps=many", "bad value for config key 'steps'"),
    ("steps=1.5", "bad value for config key 'steps'"),
    ("texture=maybe", "bad value for config key 'texture'"),
    ("sd_resolution=500", "multiple of 8"),
    ("render_resolution=0", "render_resolution must be in"),
    ("weighting=alphas", "weighting must be one of"),
    ("t_range=[0.9, 0.1]", "t_range"),
    ("t_schedule=fast", "t_schedule must be one of"),
    ("camera=3", "is a section"),
    ("guidance_scale=nan", "guidance_scale must be in"),
    ("guidance_scale=inf", "guidance_scale must be in"),
    ("lr=-1", "lr must be in"),
    ("grad_clip=-1", "grad_clip must be in"),
    ("grad_clip=0", "grad_clip must be in"),
    ("camera.distance_range=[0, 3]", "camera.distance_range"),
    ("camera.fov_range=[40, 200]", "camera.fov_range"),
    ("light.ambient=-1", "light.ambient"),
    ("raster.sigma=-1", "raster.sigma"),
    ("raster.faces_per_pixel=0", "raster.faces_per_pixel"),
    ("seed=18446744073709551616", "seed must be in"),
    ("seed=-1", "seed must be in"),
    ("prompts_per_device=0", "prompts_per_device"),
    ("prompts_per_device=-3", "prompts_per_device"),
    ("prompts_per_device=1.5", "prompts_per_device"),
    ("prompts_per_device=many", "prompts_per_device"),
    ("prior.fold_cos=2", "prior.fold_cos must be in"),
    ("pose_joints=[jaw, jaw]", "pose_joints"),
    ("=3", "bad override"),
    ("justakey", "bad override"),
  ],
)
def test_bad_overrides_are_one_line_errors(override, words):
  with pytest.raises(ConfigError) as e:
    config_lib.load_config(None, [override])
  assert words in str(e.value)
  assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
  cases = {
    "missing": (tmp_path / "nope.yaml", "not found"),
    "folder": (tmp_path, "is a folder"),
  }
  bad = tmp_path / "bad.yaml"
  bad.write_text("steps: [1, 2\n")
  cases["yaml"] = (bad, "not valid YAML")
  listy = tmp_path / "list.yaml"
  listy.write_text("- 1\n- 2\n")
  cases["list"] = (listy, "mapping")
  unknown = tmp_path / "unknown.yaml"
  unknown.write_text("stpes: 3\n")
  cases["unknown"] = (unknown, "unknown config key 'stpes' (did you mean 'steps'?)")
  binary = tmp_path / "binary.yaml"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
  cases["binary"] = (binary, "not UTF-8")
  nul = tmp_path / "nul.yaml"
  nul.write_bytes(b"steps: 3\x00\n")
  cases["nul"] = (nul, "binary")
  for name, (path, words) in cases.items():
    with pytest.raises(ConfigError) as e:
      config_lib.load_config(path)
    assert words in str(e.value), (name, str(e.value))
    assert "\n" not in str(e.value)


def test_empty_yaml_is_the_defaults(tmp_path):
  empty = tmp_path / "empty.yaml"
  empty.write_text("# nothing\n")
  assert config_lib.load_config(empty) == config_lib.FitConfig()


@dataclasses.dataclass(frozen=True)
class _Section:
  size: int = 2

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"size must be at least 1, got {self.size}")


@dataclasses.dataclass
class _Schema:
  name: str = "x"
  rate: float = 0.5
  section: _Section = dataclasses.field(default_factory=_Section)


def test_structured_loader_knows_no_fit_config(tmp_path):
  """The loader works on any dataclass schema: sections found from the types, strings kept as
  typed, a section's own ValueError prefixed with its key, near misses suggested."""
  from sdsjax.structured_config import load_structured

  path = tmp_path / "c.yaml"
  path.write_text("rate: 1e-5\nsection:\n  size: 3\n")
  cfg = load_structured(_Schema, path, ["name=007", "section.size=4"])
  assert cfg == _Schema(name="007", rate=1e-5, section=_Section(size=4))
  with pytest.raises(ConfigError, match=r"^section\.size must be at least 1, got 0$"):
    load_structured(_Schema, None, ["section.size=0"])
  with pytest.raises(
    ConfigError, match=r"unknown config key 'section.szie' \(did you mean 'section.size'\?\)"
  ):
    load_structured(_Schema, None, ["section.szie=1"])
  with pytest.raises(ConfigError, match="'section' is a section"):
    load_structured(_Schema, None, ["section=1"])
