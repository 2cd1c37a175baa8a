"""A structural check of JPEG files that catches damage a full decode lets through.

libjpeg decodes a JPEG whose compressed data was overwritten with zeros as if nothing were wrong: zero bits are
valid Huffman codes, so the image decodes to wrong pixels, and the "Corrupt JPEG data" warnings libjpeg raises
are dropped by Pillow. Walking the file's markers finds the common form of that damage for the price of a byte
scan: a file whose end was zero-filled or cut (a partial copy, a sparse file after a crash) has no end-of-image
marker after its image data. Zeros in the middle of the compressed data, with the end intact, are not found
without a decoder that reports libjpeg's warnings (see docs/data.md).
"""

from __future__ import annotations

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Markers without a length field: TEM and the restart markers RST0-RST7.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def jpeg_damage(data: bytes) -> str | None:
    """What is wrong with the JPEG's marker structure, or None when it ends the way a whole file does.

    Follows the segments from the start-of-image marker through each scan's compressed data (which ends at the
    first marker that is not a stuffed 0xFF00 or a restart marker) to the end-of-image marker. Bytes after that
    marker (camera trailers, appended videos) are allowed.

    Args:
        data: the file's bytes.

    Returns:
        A short description of the damage, or None.
    """
    if data[:2] != b"\xff\xd8":
        return "no start-of-image marker"
    pos, size = 2, len(data)
    while pos < size:
        if data[pos] != 0xFF:
            return f"no marker at byte {pos} where a segment should start"
        while pos < size and data[pos] == 0xFF:  # a marker may be preceded by fill bytes 0xFF
            pos += 1
        if pos >= size:
            break
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            return None
        if marker in _STANDALONE:
            continue
        if pos + 2 > size:
            break
        pos += (data[pos] << 8) | data[pos + 1]  # the length counts its own two bytes
        if marker == _SOS:
            pos = _end_of_scan(data, pos)
    return "no end-of-image marker: the file was cut short or its end overwritten"


# Start-of-frame markers (the frame header holds the image size): SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC).
_FRAMES = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, found by walking the segments before the first scan.

    Args:
        data: the file's bytes.

    Returns:
        The size, or None when the data does not start as a JPEG with a frame header of non-zero size before its
        first scan (the caller then asks Pillow, which names the problem).
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, size = 2, len(data)
    while pos + 4 <= size and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _FRAMES:
            if pos + 9 > size:
                return None
            height, width = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
            return (width, height) if width and height else None
        if marker in (_SOS, _EOI):
            return None
        pos += 2 if marker in _STANDALONE else 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return None


def _end_of_scan(data: bytes, pos: int) -> int:
    """Position of the marker that ends the compressed data starting at pos (len(data) when there is none)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1 if following == 0xFF else 2  # stuffed byte, restart marker, or fill before a marker
            continue
        return pos
