"""Image-text retrieval: COCO 5K and Flickr30K 1K (Karpathy test splits), and their I2I variants.

Protocol (docs/benchmarks-data.md): exact dot-product scores between L2-normalised embeddings;
text->image R@k counts a caption as a hit when its image is in its top k; image->text R@k counts an
image as a hit when ANY of its captions is in its top k. Metrics are fractions in [0, 1]; the
paper's numbers (`paper`) are percent.

The package, in the order the data flows:

- `formats`: the annotation files as `Entry` lists (Karpathy `dataset_*.json`, CLIP_benchmark's
  COCO caption JSON and Flickr30K txt);
- `pairs`: entries -> a checked `PairSet` (images, captions, caption -> image), data problems
  counted and reported (`Problems`), captions cut and truncated (`assemble`);
- `render`: captions drawn as images for the I2I variants (`CaptionRenderer`);
- `benchmark`: `ImageTextBenchmark`, which embeds a `PairSet` and scores it both ways (the world
  and KARR benchmarks subclass it);
- `karpathy`: COCO and Flickr30K (and their I2I variants), registered by name.
"""

from slq.benchmarks.image_text.benchmark import (
    CURVE_K,
    DEFAULT_PROMPTS,
    ImageTextBenchmark,
    work_dir,
)
from slq.benchmarks.image_text.formats import (
    IMAGE_SUFFIXES,
    read_coco_captions,
    read_flickr_txt,
    read_json,
    read_karpathy,
)
from slq.benchmarks.image_text.karpathy import (
    Coco,
    CocoI2I,
    Flickr30k,
    Flickr30kI2I,
    KarpathyBenchmark,
)
from slq.benchmarks.image_text.pairs import (
    N_EXAMPLES,
    Entry,
    PairSet,
    Problems,
    assemble,
    pick_images_dir,
)
from slq.benchmarks.image_text.render import (
    CANVAS,
    FONT_SIZE,
    MARGIN,
    RENDER_VERSION,
    CaptionRenderer,
    find_font,
)

__all__ = [
    "CANVAS", "CURVE_K", "DEFAULT_PROMPTS", "FONT_SIZE", "IMAGE_SUFFIXES", "MARGIN", "N_EXAMPLES", "RENDER_VERSION",
    "CaptionRenderer", "Coco", "CocoI2I", "Entry", "Flickr30k", "Flickr30kI2I", "ImageTextBenchmark",
    "KarpathyBenchmark", "PairSet", "Problems", "assemble", "find_font", "pick_images_dir", "read_coco_captions",
    "read_flickr_txt", "read_json", "read_karpathy", "work_dir",
]
