"""Reads untrusted `.npz` files with every size checked before anything is allocated.

`numpy.load` trusts a member's `.npy` header: a header that declares a petabyte-sized array
makes it try to allocate one (a `MemoryError` traceback, or the OOM killer), and a zip
member can declare a header length of 4 GiB. `read_npz` instead reads each member's header
itself, with a bounded length, and checks the declared shape and dtype against limits and
against the member's size in the zip directory before it allocates the array. It refuses
object, structured and other non-plain dtypes (so no pickle is ever involved) and reads
exactly the declared bytes, so a zip bomb cannot decompress further than the declared array.

`check_declared_array` is the same bound for arrays declared elsewhere (the FLAME pickle
reader in `sdsjax.flame` uses it).
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from sdsjax.errors import ModelFileError

MAX_ARRAY_BYTES = 1 << 30  # one array; FLAME's largest (shapedirs) is 48 MB
MAX_TOTAL_BYTES = 2 << 30  # all arrays read from one file
MAX_MEMBERS = 1024
MAX_NDIM = 8
MAX_HEADER_BYTES = 10_000  # numpy's own default limit for the header dict
# Plain dtypes only: bool, signed and unsigned integers, floats, complex, fixed-size strings.
PLAIN_KINDS = "biufcSU"
_MAGIC = b"\x93NUMPY"


def check_declared_array(
  shape, dtype: np.dtype, what: str, max_bytes: int = MAX_ARRAY_BYTES
) -> int:
  """Checks a shape and dtype that a file declares, before an array is allocated.

  Args:
    shape: the declared shape, a tuple of ints.
    dtype: the declared dtype.
    what: names the array in the error message, e.g. "/path/file.npz: 'vt'".
    max_bytes: the largest array allowed.

  Returns:
    The array's size in bytes (computed in Python integers, so it cannot overflow).

  Raises:
    ModelFileError: a non-plain dtype (object, structured, subarray, datetime, void), a
      malformed shape, or more than `max_bytes` bytes.
  """
  dtype = np.dtype(dtype)
  if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
    raise ModelFileError(f"{what}: has dtype {dtype}; only plain numeric arrays are accepted")
  if dtype.kind not in PLAIN_KINDS:
    raise ModelFileError(f"{what}: has dtype {dtype}; only plain numeric arrays are accepted")
  if (
    not isinstance(shape, tuple)
    or len(shape) > MAX_NDIM
    or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape)
    or any(n < 0 for n in shape)
  ):
    raise ModelFileError(f"{what}: declares an invalid shape {shape!r}")
  nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
  if nbytes > max_bytes:
    raise ModelFileError(
      f"{what}: declares shape {tuple(int(n) for n in shape)} of {dtype} "
      f"({nbytes:.3g} bytes), over the {max_bytes:.3g}-byte limit; the file is corrupt or hostile"
    )
  return nbytes


def _read_header(member, what: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
  """Reads a `.npy` header with a bounded length; returns shape, fortran order, dtype, length."""
  prefix = member.read(8)
  if len(prefix) < 8 or prefix[:6] != _MAGIC:
    raise ModelFileError(f"{what}: is not a .npy array")
  version = (prefix[6], prefix[7])
  if version == (1, 0):
    size_format = "<H"
  elif version == (2, 0):
    size_format = "<I"
  else:  # 3.0 only adds utf-8 field names, i.e. structured dtypes, which are refused anyway
    raise ModelFileError(f"{what}: unsupported .npy format version {version[0]}.{version[1]}")
  size_bytes = member.read(struct.calcsize(size_format))
  if len(size_bytes) != struct.calcsize(size_format):
    raise ModelFileError(f"{what}: truncated .npy header")
  (header_len,) = struct.unpack(size_format, size_bytes)
  if header_len > MAX_HEADER_BYTES:
    raise ModelFileError(f"{what}: .npy header of {header_len} bytes is too long")
  header = member.read(header_len)
  if len(header) != header_len:
    raise ModelFileError(f"{what}: truncated .npy header")
  reader = (
    npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
  )
  stream = io.BytesIO(size_bytes + header)
  try:
    shape, fortran_order, dtype = reader(stream, max_header_size=MAX_HEADER_BYTES)
  except (ValueError, TypeError, SyntaxError, OverflowError) as e:
    raise ModelFileError(f"{what}: bad .npy header ({' '.join(str(e).split())[:200]})") from None
  return shape, fortran_order, dtype, len(prefix) + len(size_bytes) + header_len


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str, budget: int):
  with archive.open(info) as member:
    shape, fortran_order, dtype, header_bytes = _read_header(member, what)
    nbytes = check_declared_array(shape, dtype, what, budget)
    if header_bytes + nbytes != info.file_size:
      raise ModelFileError(
        f"{what}: its header declares {nbytes} bytes of data but the zip member holds "
        f"{info.file_size - header_bytes}; the file is corrupt"
      )
    count = math.prod(shape)
    flat = np.empty(count, dtype)
    view = memoryview(flat.view(np.uint8))
    done = 0
    while done < nbytes:
      got = member.readinto(view[done:])
      if not got:
        raise ModelFileError(f"{what}: truncated array data")
      done += got
    if member.read(1):  # also makes zipfile check the member's CRC
      raise ModelFileError(f"{what}: trailing data after the array")
  if fortran_order:
    return flat.reshape(shape[::-1]).transpose(), nbytes
  return flat.reshape(shape), nbytes


def read_npz(
  path: str | Path,
  keys: Iterable[str] | None = None,
  *,
  max_array_bytes: int = MAX_ARRAY_BYTES,
  max_total_bytes: int = MAX_TOTAL_BYTES,
) -> dict[str, np.ndarray]:
  """Reads arrays from an untrusted `.npz` (plain or compressed), bounded in size.

  Args:
    path: the file.
    keys: the arrays to read (names without `.npy`); absent ones are simply missing from
      the result. None reads every member.
    max_array_bytes: the largest array allowed.
    max_total_bytes: the most bytes of arrays read from the file.

  Returns:
    {name: array}, like `dict(np.load(path, allow_pickle=False))`.

  Raises:
    ModelFileError (one line): the file is missing or not a zip, a member is not a plain
      `.npy` array, its header is malformed, declares more than the limits or disagrees
      with the member's size, or its data is truncated or fails the CRC.
  """
  path = Path(path)
  wanted = None if keys is None else set(keys)
  arrays: dict[str, np.ndarray] = {}
  try:
    with zipfile.ZipFile(path) as archive:
      members = archive.infolist()
      if len(members) > MAX_MEMBERS:
        raise ModelFileError(f"{path}: {len(members)} members, more than {MAX_MEMBERS}")
      total = 0
      for info in members:
        name = info.filename.removesuffix(".npy")
        if info.is_dir() or (wanted is not None and name not in wanted):
          continue
        what = f"{path}: '{name}'"
        budget = min(max_array_bytes, max_total_bytes - total)
        # The budget bounds both this array and the file's total.
        array, nbytes = _read_member(archive, info, what, budget)
        total += nbytes
        arrays[name] = array
  except ModelFileError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as e:
    # NotImplementedError: an unsupported zip compression method.
    if isinstance(e, FileNotFoundError):
      raise ModelFileError(f"file not found: {path}") from None
    reason = " ".join(str(e).split())[:200]
    raise ModelFileError(f"{path}: not a readable .npz file ({reason})") from None
  return arrays
