"""Datasets: the manifest format and the built-in synthetic world."""

from slq.data.world import generate_world, image_path, load_manifest

__all__ = ["generate_world", "image_path", "load_manifest"]
