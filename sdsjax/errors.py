"""User-facing errors.

Everything a user can cause (a bad file, a bad config, a missing model) raises a subclass of
`SdsjaxError`. The CLI prints its message as one line and exits with code 2, so messages must
say what is wrong and what to do, on one line.
"""


class SdsjaxError(ValueError):
  """Base class of errors caused by user input."""


class ConfigError(SdsjaxError):
  """A bad configuration value, key or command-line flag."""


class ModelFileError(SdsjaxError):
  """A morphable-model file that is missing, malformed or inconsistent."""


class CheckpointError(SdsjaxError):
  """A Stable Diffusion checkpoint that is missing or does not match its config."""
