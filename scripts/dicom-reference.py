"""Decodes DICOM files with pydicom (and pylibjpeg for JPEG and JPEG 2000), the reference
decoder the validation tests compare against. For each file it can decode it writes, into OUT,
the first frame's stored sample values (no modality or VOI LUT) as little-endian int32 in
NAME.i32, and NAME.json with rows, columns and samples per pixel. Files pydicom cannot decode
are skipped.

Usage: python dicom-reference.py OUT FILE...
"""
import json
import pathlib
import sys

import numpy
import pydicom


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[2:]:
        path = pathlib.Path(name)
        try:
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
        except Exception:  # noqa: BLE001 - a file the reference cannot decode is not compared
            continue
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        if frames > 1:
            pixels = pixels[0]
        samples = int(getattr(dataset, "SamplesPerPixel", 1))
        (out / f"{path.stem}.i32").write_bytes(numpy.ascontiguousarray(pixels, dtype="<i4").tobytes())
        (out / f"{path.stem}.json").write_text(
            json.dumps({"rows": int(dataset.Rows), "columns": int(dataset.Columns), "samples": samples})
        )


if __name__ == "__main__":
    main()
