"""Datasets: the manifest format and converters into it (COCO)."""

from slq.data.manifest import image_path, load_manifest

__all__ = ["image_path", "load_manifest"]
