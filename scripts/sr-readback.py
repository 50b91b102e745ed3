"""Reads a MedAI Flow Structured Report back with highdicom, as an AI result consumer would, and
prints what it found as JSON (a list, one object per file): the document class highdicom chose, the algorithm identification
(TID 4019 names: Algorithm Name, Algorithm Version), the source instances it references (the
evidence and the IMAGE content items, with their referenced frame numbers when they name
frames), and the top finding as a coded concept.

Usage: sr-readback.py REPORT.dcm... (run with the interpreter of .cache/pacs-venv, made by
scripts/pacs-tools.sh). Exits non-zero when highdicom cannot read the file as an SR document.
"""

import json
import sys

import highdicom as hd
from pydicom.sr.coding import Code


def read(path):
    report = hd.sr.srread(path)

    def texts(code_value, meaning):
        items = hd.sr.utils.find_content_items(
            report, name=Code(code_value, "DCM", meaning), recursive=True
        )
        return [hd.sr.TextContentItem.from_dataset(item).value for item in items]

    images = hd.sr.utils.find_content_items(report, value_type="IMAGE", recursive=True)
    image_references = []
    for item in images:
        image = hd.sr.ImageContentItem.from_dataset(item)
        reference = {
            "sop_class_uid": str(image.referenced_sop_class_uid),
            "sop_instance_uid": str(image.referenced_sop_instance_uid),
        }
        # Named only when the item references frames of a multi-frame source (issue 15).
        if image.referenced_frame_numbers is not None:
            reference["referenced_frame_numbers"] = [
                int(frame) for frame in image.referenced_frame_numbers
            ]
        image_references.append(reference)
    findings = []
    for item in hd.sr.utils.find_content_items(
        report, name=Code("121071", "DCM", "Finding"), recursive=True
    ):
        value = hd.sr.CodeContentItem.from_dataset(item).value
        findings.append(
            {
                "value": value.value,
                "scheme": value.scheme_designator,
                "meaning": value.meaning,
            }
        )
    return {
        "document_class": type(report).__name__,
        "template": str(report.ContentTemplateSequence[0].TemplateIdentifier),
        "algorithm_names": texts("111001", "Algorithm Name"),
        "algorithm_versions": texts("111003", "Algorithm Version"),
        "evidence": [
            {
                "study_instance_uid": str(study),
                "series_instance_uid": str(series),
                "sop_instance_uid": str(instance),
                "sop_class_uid": str(sop_class),
            }
            for study, series, instance, sop_class in report.get_evidence()
        ],
        "image_references": image_references,
        "findings": findings,
    }


if __name__ == "__main__":
    print(json.dumps([read(path) for path in sys.argv[1:]]))
