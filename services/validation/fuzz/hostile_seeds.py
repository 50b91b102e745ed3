#!/usr/bin/env python3
"""Writes hostile seeds for the decode fuzz target into the corpus folder given as argument.

Shapes the service must refuse from headers, so the fuzzer starts next to each check rather than
having to find it: sequences nested past the depth limit (explicit and undefined lengths,
implicit VR, deflated), more elements than the count limit, deflate bombs (huge declared sides,
huge declared frames, pixel data longer than declared), and PNG/JPEG headers declaring huge sides.
A real JPEG (the first fragment of a pydicom test file) is patched for the JPEG seed.
"""

import struct
import sys
import zlib
from pathlib import Path

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
UNDEFINED = 0xFFFFFFFF
LONG_VRS = {b"OB", b"OW", b"SQ", b"UN", b"UT"}


def explicit(group, element, vr, value):
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def implicit(group, element, value):
    return struct.pack("<HHI", group, element, len(value)) + value


def padded(text, pad=b"\0"):
    data = text.encode()
    return data + pad if len(data) % 2 else data


def file_meta(transfer_syntax):
    group = (
        explicit(2, 1, b"OB", b"\0\1")
        + explicit(2, 2, b"UI", padded("1.2.840.10008.5.1.4.1.1.7"))
        + explicit(2, 3, b"UI", padded("1.2.3.4.5.6"))
        + explicit(2, 0x10, b"UI", padded(transfer_syntax))
    )
    return b"\0" * 128 + b"DICM" + explicit(2, 0, b"UL", struct.pack("<I", len(group))) + group


def grey_header(rows, columns, frames=None, as_implicit=False):
    element = (lambda g, e, vr, v: implicit(g, e, v)) if as_implicit else explicit
    header = element(0x28, 2, b"US", struct.pack("<H", 1))
    header += element(0x28, 4, b"CS", b"MONOCHROME2 ")
    if frames is not None:
        header += element(0x28, 8, b"IS", padded(str(frames), b" "))
    header += element(0x28, 0x10, b"US", struct.pack("<H", rows))
    header += element(0x28, 0x11, b"US", struct.pack("<H", columns))
    for tag, value in ((0x100, 8), (0x101, 8), (0x102, 7), (0x103, 0)):
        header += element(0x28, tag, b"US", struct.pack("<H", value))
    return header


def nested(depth, defined, explicit_vr=True):
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner) if defined else UNDEFINED) + inner
        if not defined:
            item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        sequence = struct.pack("<HH", 0x0040, 0xA730)
        if explicit_vr:
            sequence += b"SQ\0\0"
        sequence += struct.pack("<I", len(item) if defined else UNDEFINED) + item
        if not defined:
            sequence += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        inner = sequence
    return inner


def deflate(data):
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def small_image(extra, transfer_syntax):
    pixels = bytes(index % 251 for index in range(64 * 64))
    if transfer_syntax == IMPLICIT:
        data_set = grey_header(64, 64, as_implicit=True) + extra + implicit(0x7FE0, 0x10, pixels)
    else:
        data_set = grey_header(64, 64) + extra + explicit(0x7FE0, 0x10, b"OB", pixels)
    body = deflate(data_set) if transfer_syntax == DEFLATED else data_set
    return file_meta(transfer_syntax) + body


def deflate_bomb(rows, columns, frames, declared_pixels, present_pixels):
    header = grey_header(rows, columns, frames)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x10, b"OB", 0, declared_pixels)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = compressor.compress(header + pixel_header)
    chunk = b"\0" * (1 << 20)
    left = present_pixels
    while left > 0:
        body += compressor.compress(chunk[: min(left, len(chunk))])
        left -= len(chunk)
    return file_meta(DEFLATED) + body + compressor.flush()


def png_declaring(width, height):
    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def jpeg_declaring(source, width, height):
    start = source.index(b"\xff\xd8\xff")
    end = source.index(b"\xff\xd9", start) + 2
    jpeg = bytearray(source[start:end])
    frame = jpeg.index(b"\xff\xc0")
    jpeg[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def main():
    corpus = Path(sys.argv[1])
    jpeg_source = Path(sys.argv[2]).read_bytes()
    many_elements = b"".join(explicit(0x0009, 0x1000, b"UN", b"") for _ in range(200_001))
    seeds = {
        "hostile-nested-explicit.dcm": small_image(nested(64, True), EXPLICIT),
        "hostile-nested-undefined.dcm": small_image(nested(64, False), EXPLICIT),
        "hostile-nested-implicit.dcm": small_image(nested(64, True, explicit_vr=False), IMPLICIT),
        "hostile-nested-deflated.dcm": small_image(nested(64, False), DEFLATED),
        "hostile-nested-within-limit.dcm": small_image(nested(8, True), EXPLICIT),
        "hostile-many-elements-deflated.dcm": small_image(many_elements, DEFLATED),
        # 16384 x 16384 declared, the first MiB of its zeros present.
        "hostile-deflate-bomb-sides.dcm": deflate_bomb(16384, 16384, None, 16384 * 16384, 1 << 20),
        # Sides within the fuzz limits (1024), 100 frames: 100 MiB declared.
        "hostile-deflate-bomb-frames.dcm": deflate_bomb(1024, 1024, 100, 100 << 20, 1 << 20),
        # 64 x 64 declared, 4 MiB of pixel data: more than the header allows to inflate.
        "hostile-deflate-overlong-pixels.dcm": deflate_bomb(64, 64, None, 4 << 20, 4 << 20),
        "hostile-png-huge-sides.png": png_declaring(100_000, 100_000),
        "hostile-jpeg-huge-sides.jpg": jpeg_declaring(jpeg_source, 65_000, 65_000),
    }
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)


if __name__ == "__main__":
    main()
