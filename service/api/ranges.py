"""HTTP byte ranges (RFC 9110 section 14): the single-range subset that resumable downloads use."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"(\d*)-(\d*)")


class RangeNotSatisfiable(ValueError):
    """A well-formed range that selects no byte of the representation (HTTP 416)."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, stop) of a representation of `size` bytes."""

    start: int
    stop: int
    size: int

    @property
    def length(self) -> int:
        """How many bytes the range holds."""
        return self.stop - self.start

    def content_range(self) -> str:
        """The Content-Range header of a 206 answer (its last position is inclusive)."""
        return f"bytes {self.start}-{self.stop - 1}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range a Range header asks for, or None to send the whole file.

    Headers we do not serve as a range (absent, malformed, another unit, several ranges) give None:
    RFC 9110 lets a server ignore Range. Raises RangeNotSatisfiable for a range wholly past the end.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _SPEC.fullmatch(spec.strip())
    if match is None or match.group(0) == "-":
        return None
    first, last = match.groups()
    if not first:  # "-n": the last n bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"bytes=-{suffix} selects nothing of {size} bytes")
        return ByteRange(max(size - suffix, 0), size, size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at byte {start}, but the file has {size} bytes")
    stop = min(int(last) + 1, size) if last else size
    return ByteRange(start, stop, size)
