"""A minimal reader of a GGUF file's key-value header (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).

Discovery needs two or three strings (`general.architecture`, `general.name`, `split.count`) from files that
may be tens of gigabytes, so this reads the header sequentially, seeks over values it does not want, and
stops as soon as it has what it was asked for. Every length is bounded before it is trusted: a corrupt or
hostile file gets a GGUFError, never a huge allocation or an endless loop. (The `gguf` package can read
these headers too; it is not a dependency of the control plane.)

Layout, little-endian: magic "GGUF", version u32, tensor_count, kv_count, then kv_count times
(key: string, value_type: u32, value). Strings are a length then UTF-8 bytes. Versions 2 and 3 use u64 for
counts and lengths, version 1 used u32.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
# value type -> struct format of a scalar
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
MAX_KEYS = 100_000  # more metadata keys than any real model has
MAX_STRING = 1 << 20  # a key or a wanted value longer than this is corrupt
MAX_STEPS = 4_000_000  # values read or skipped in all: bounds the work on a corrupt file
MAX_DEPTH = 4  # arrays of arrays
MAX_ARRAY = 1 << 32  # elements in one array (a seek over fixed-size ones stays a plausible offset)


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands; the message says why."""


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.wide = True  # u64 lengths (versions 2 and 3)
        self.steps = 0

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError("the GGUF header is truncated")
        return data

    def unpack(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def length(self) -> int:
        return int(self.unpack("<Q" if self.wide else "<I"))

    def string(self) -> str:
        n = self.length()
        if n > MAX_STRING:
            raise GGUFError(f"a GGUF string of {n} bytes is implausible (corrupt file?)")
        return self.take(n).decode("utf-8", errors="replace")

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise GGUFError("the GGUF metadata is too large to read")

    def value(self, vtype: int) -> object:
        self.tick()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.array_header()
            self.tick(count)
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"unknown GGUF value type {vtype}")

    def skip(self, vtype: int, depth: int = 0) -> None:
        self.tick()
        if vtype in _SCALARS:
            self.f.seek(struct.calcsize(_SCALARS[vtype]), 1)
        elif vtype == STRING:
            self.f.seek(self.length(), 1)  # a seek past the end shows as truncation at the next read
        elif vtype == ARRAY:
            if depth >= MAX_DEPTH:
                raise GGUFError("GGUF arrays are nested too deep")
            etype, count = self.array_header()
            if etype in _SCALARS:
                self.f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
            else:
                for _ in range(count):  # bounded: each element ticks
                    self.skip(etype, depth + 1)
        else:
            raise GGUFError(f"unknown GGUF value type {vtype}")

    def array_header(self) -> tuple[int, int]:
        etype = int(self.unpack("<I"))
        count = self.length()
        if etype not in _SCALARS and etype not in (STRING, ARRAY):
            raise GGUFError(f"unknown GGUF value type {etype}")
        if count > MAX_ARRAY:
            raise GGUFError(f"a GGUF array of {count} values is implausible (corrupt file?)")
        return etype, count


def read_metadata(path: Path, wanted: Collection[str], enough: Collection[str] = ()) -> dict[str, object]:
    """The wanted keys' values (those present), read from the header of the GGUF file at `path`; reading
    stops once every key of `enough` (default: all wanted) is found, before the tokenizer's long arrays.

    Raises GGUFError for a file that is not GGUF or is corrupt, OSError when it cannot be read.
    """
    found: dict[str, object] = {}
    enough = set(enough or wanted)
    with path.open("rb") as f:
        r = _Reader(f)
        if f.read(4) != MAGIC:
            raise GGUFError("not a GGUF file (no GGUF magic at its start)")
        version = int(r.unpack("<I"))
        if version not in (1, 2, 3):
            if version & 0xFFFF == 0 and version:
                raise GGUFError("big-endian GGUF files are not supported")
            raise GGUFError(f"GGUF version {version} is not supported (1 to 3 are)")
        r.wide = version >= 2
        r.length()  # tensor count: not needed here
        kv_count = r.length()
        if kv_count > MAX_KEYS:
            raise GGUFError(f"{kv_count} GGUF metadata keys is implausible (corrupt file?)")
        for _ in range(kv_count):
            key = r.string()
            vtype = int(r.unpack("<I"))
            if key in wanted:
                found[key] = r.value(vtype)
                if enough <= found.keys():
                    break
            else:
                r.skip(vtype)
    return found
