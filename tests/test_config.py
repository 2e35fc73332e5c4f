"""Config loading: YAML files in configs/, overrides, and one-line errors for bad input."""

from pathlib import Path

import pytest

from sdsjax import config as config_lib
from sdsjax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["default", "sd21", "texture", "tiny"])
def test_shipped_configs_load(name):
  cfg = config_lib.load_config(CONFIGS / f"{name}.yaml")
  assert cfg.sd_resolution % 8 == 0


def test_default_is_dreamfusion_like():
  cfg = config_lib.load_config(CONFIGS / "default.yaml")
  assert cfg.guidance_scale == 100.0
  assert cfg.t_range == (0.02, 0.98)
  assert cfg.sd_resolution == 512
  assert cfg.weighting == "sds"


def test_overrides_reach_sections_and_parse_numbers():
  cfg = config_lib.load_config(
    CONFIGS / "tiny.yaml",
    [
      "guidance_scale=7.5",
      "raster.sigma=1e-5",
      "camera.elevation_range=[0, 30]",
      "texture=true",
      {"steps": 3},
    ],
  )
  assert cfg.guidance_scale == 7.5
  assert cfg.raster.sigma == 1e-5
  assert cfg.camera.elevation_range == (0.0, 30.0)
  assert cfg.texture is True and cfg.steps == 3
  assert config_lib.to_dict(cfg)["camera"]["elevation_range"] == [0.0, 30.0]


@pytest.mark.parametrize(
  "override, words",
  [
    ("guidance=3", "unknown config key 'guidance'"),
    ("raster.sigmaa=1", "unknown config key 'raster.sigmaa'"),
    ("steps=many", "bad value for config key 'steps'"),
    ("sd_resolution=500", "multiple of 8"),
    ("render_resolution=0", "multiple of 8"),
    ("weighting=alphas", "weighting"),
    ("t_range=[0.9, 0.1]", "t_range"),
    ("camera=3", "section"),
  ],
)
def test_bad_overrides_are_one_line_errors(override, words):
  with pytest.raises(ConfigError) as e:
    config_lib.load_config(None, [override])
  assert words in str(e.value)
  assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    config_lib.load_config(tmp_path / "nope.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("steps: [1, 2\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    config_lib.load_config(bad)
  listy = tmp_path / "list.yaml"
  listy.write_text("- 1\n- 2\n")
  with pytest.raises(ConfigError, match="mapping"):
    config_lib.load_config(listy)
  unknown = tmp_path / "unknown.yaml"
  unknown.write_text("stpes: 3\n")
  with pytest.raises(ConfigError, match="unknown config key 'stpes'"):
    config_lib.load_config(unknown)


def test_dataclass_defaults_equal_default_yaml():
  assert config_lib.to_dict(config_lib.load_config(CONFIGS / "default.yaml")) == config_lib.to_dict(
    config_lib.FitConfig()
  )
