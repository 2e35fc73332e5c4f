"""Text a user hands over (config files, prompt files, prompts): read it or refuse it in one line.

A FIFO would block and /dev/zero never ends, so only regular files are read, and only up to a
size that no such file reaches.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdsjax.errors import ConfigError


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int) -> str:
  """The UTF-8 text of the regular file `path` (`what` names it in errors, e.g. "config file").

  Raises:
    ConfigError: a missing path, a folder or special file, more than `max_bytes`, bytes that
      are not UTF-8, or a NUL byte (a binary file).
  """
  path = Path(path)
  if path.is_dir():
    raise ConfigError(f"{what} {path} is a folder, not a text file")
  if not path.exists():
    raise ConfigError(f"{what} {path} not found")
  if not path.is_file():
    raise ConfigError(f"{what} {path} is not a regular file: save its text in one")
  try:
    size = path.stat().st_size
    if size > max_bytes:
      raise ConfigError(
        f"{what} {path} is too large ({size / 2**20:.1f} MiB, at most {max_bytes / 2**20:g} "
        "MiB): is it the right file?"
      )
    data = path.read_bytes()
  except OSError as e:
    raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise ConfigError(f"{what} {path} is not UTF-8 text (line {line}): save it as UTF-8") from None
  if "\0" in text:
    raise ConfigError(f"{what} {path} is binary (it holds NUL bytes), not text")
  return text


def check_text(text: str, what: str, max_chars: int | None = None) -> None:
  """Refuses text no file or tokenizer can hold: NUL, undecodable bytes, too many characters."""
  if "\0" in text:
    raise ConfigError(f"{what} contains a NUL character: remove it")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    raise ConfigError(
      f"{what} is not valid UTF-8 text (a byte sequence your terminal or file could not "
      "decode): retype it, or set a UTF-8 locale (LANG=C.UTF-8)"
    ) from None
  if max_chars is not None and len(text) > max_chars:
    raise ConfigError(f"{what} has {len(text)} characters, more than {max_chars}: shorten it")
