"""Decodes DICOM files with pydicom (and pylibjpeg for JPEG and JPEG 2000), the reference
decoder the validation tests compare against. For each file it can decode it writes, into OUT:
- NAME.i32: the first frame's stored sample values (no modality or VOI LUT), little-endian
  int32, and NAME.json with rows, columns and samples per pixel;
- NAME.display.u8, for grey images: the 8-bit display image of PS3.3 C.11, computed with
  pydicom's own modality LUT and windowing functions: rescale, then the first window (or the
  image's own range when there is none), scaled to 0-255, inverted for MONOCHROME1.
Files pydicom cannot decode are skipped.

It also writes OUT/derived/*.dcm: real files changed with pydicom to cover what the public
set lacks (MONOCHROME1, a rescale slope, the LINEAR_EXACT and SIGMOID window functions).

Usage: python dicom-reference.py OUT FILE...
"""
import json
import pathlib
import sys

import numpy
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_windowing


def derive(source: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """Variants of real grey images, each changing only display attributes."""
    variants = {
        "MR_small_monochrome1.dcm": ("MR_small.dcm", {"PhotometricInterpretation": "MONOCHROME1"}),
        "CT_small_monochrome1_window.dcm": (
            "CT_small.dcm",
            {"PhotometricInterpretation": "MONOCHROME1", "WindowCenter": "40", "WindowWidth": "400"},
        ),
        "MR_small_rescaled.dcm": (
            "MR_small.dcm",
            {"RescaleSlope": "2.5", "RescaleIntercept": "-100", "WindowCenter": "1400", "WindowWidth": "3000"},
        ),
        "CT_small_linear_exact.dcm": (
            "CT_small.dcm",
            {"VOILUTFunction": "LINEAR_EXACT", "WindowCenter": "40", "WindowWidth": "350"},
        ),
        "CT_small_sigmoid.dcm": (
            "CT_small.dcm",
            {"VOILUTFunction": "SIGMOID", "WindowCenter": "40", "WindowWidth": "350"},
        ),
        "MR_small_rle_monochrome1.dcm": ("MR_small_RLE.dcm", {"PhotometricInterpretation": "MONOCHROME1"}),
    }
    keywords_vr = {"PhotometricInterpretation": "CS", "VOILUTFunction": "LO", "RescaleSlope": "DS",
                   "RescaleIntercept": "DS", "WindowCenter": "DS", "WindowWidth": "DS"}
    derived = out / "derived"
    derived.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (base, changes) in variants.items():
        dataset = pydicom.dcmread(source / base)
        for keyword, value in changes.items():
            dataset.add_new(keyword, keywords_vr[keyword], value)
        dataset.save_as(derived / name, enforce_file_format=True)
        written.append(derived / name)
    return written


def display(dataset: Dataset, pixels: numpy.ndarray) -> numpy.ndarray | None:
    values = apply_modality_lut(pixels, dataset).astype("float64")
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        # The same window over a plain 8-bit range, so pydicom's output is 0-255 itself.
        window = Dataset()
        window.PhotometricInterpretation = "MONOCHROME2"
        window.BitsStored = 8
        window.PixelRepresentation = 0
        for keyword in ("WindowCenter", "WindowWidth"):
            element = dataset[keyword]
            setattr(window, keyword, element.value[0] if element.VM > 1 else element.value)
        if "VOILUTFunction" in dataset:
            window.VOILUTFunction = dataset.VOILUTFunction
        try:
            shown = apply_windowing(values, window)
        except ValueError:  # a window the standard does not allow: not compared
            return None
    else:
        low, high = values.min(), values.max()
        shown = (values - low) / (high - low) * 255.0 if high > low else numpy.zeros_like(values)
    shown = numpy.clip(numpy.floor(shown + 0.5), 0, 255).astype("uint8")
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        shown = 255 - shown
    return shown


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    files = [pathlib.Path(name) for name in sys.argv[2:]]
    files += derive(files[0].parent, out)
    for path in files:
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
        if samples == 1 and dataset.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2"):
            shown = display(dataset, pixels)
            if shown is not None:
                (out / f"{path.stem}.display.u8").write_bytes(numpy.ascontiguousarray(shown).tobytes())


if __name__ == "__main__":
    main()
