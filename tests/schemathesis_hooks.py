"""Schemathesis hooks for tests/test_service_schema.py (loaded with SCHEMATHESIS_HOOKS): values for
the formats that JSON Schema cannot check, so that schema-valid cases are valid requests."""

import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _png(color: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# /search's image_b64: a decodable image as base64 (or a data: URI)
schemathesis.openapi.format("image-base64", st.sampled_from(
    [_png("red"), _png("blue"), "data:image/png;base64," + _png("green")]))
