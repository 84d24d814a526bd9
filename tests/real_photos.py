"""A handful of real photographs, shipped by packages the tests install, with captions written here.

scikit-image's wheel ships sample photographs (skimage/data), scikit-learn two (china.jpg,
flower.jpg), matplotlib one (grace_hopper.jpg). None of those modules is imported: the files are
found through their packages' install folders. `write_csv(out)` copies them under `out/images/`
and writes `out/photos.csv` (image, caption), two captions per photograph, the form `slq data
import --format csv` reads. Used by the own-data road's tests, and runnable:

    python tests/real_photos.py /tmp/photos     # then: slq data import /tmp/photos/photos.csv --out data/photos
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
import sys
from pathlib import Path

# (package, path inside it) -> two captions written for that photograph
PHOTOS: dict[tuple[str, str], tuple[str, str]] = {
    ("skimage", "data/astronaut.png"): ("an astronaut in a white suit in front of a flag",
                                        "portrait of a smiling woman astronaut holding a helmet"),
    ("skimage", "data/camera.png"): ("a black and white photo of a man with a camera on a tripod",
                                     "a photographer standing in a field with an old film camera"),
    ("skimage", "data/chelsea.png"): ("a ginger tabby cat looking to the side",
                                      "close up of an orange cat with white whiskers"),
    ("skimage", "data/coffee.png"): ("a cup of coffee on a saucer with a spoon",
                                     "a white coffee cup seen from above on a red table"),
    ("skimage", "data/coins.png"): ("many old coins lying on a dark surface",
                                    "a grey photo of rows of small round coins"),
    ("skimage", "data/rocket.jpg"): ("a rocket on the launch pad under a blue sky",
                                     "a space launch vehicle standing on its tower"),
    ("skimage", "data/hubble_deep_field.jpg"): ("thousands of distant galaxies on a black sky",
                                                "a deep space telescope image full of galaxies"),
    ("skimage", "data/moon.png"): ("the surface of the moon with craters",
                                   "a grey lunar landscape seen from above"),
    ("skimage", "data/motorcycle_left.png"): ("a red motorcycle parked in a workshop",
                                              "a motorbike standing in a room with shelves"),
    ("skimage", "data/grass.png"): ("a patch of green grass seen from above",
                                    "close up of blades of grass"),
    ("skimage", "data/gravel.png"): ("small grey stones of a gravel path",
                                     "a texture of pebbles and gravel"),
    ("skimage", "data/brick.png"): ("a wall of bricks in a regular pattern",
                                    "grey brick wall texture"),
    ("skimage", "data/retina.jpg"): ("a medical photo of the retina of an eye",
                                     "the back of a human eye with red blood vessels"),
    ("skimage", "data/ihc.png"): ("a stained tissue sample under a microscope",
                                  "brown and blue cells in a microscope slide"),
    ("skimage", "data/page.png"): ("a scanned page of printed text",
                                   "a photo of a book page with lines of words"),
    ("sklearn", "datasets/images/china.jpg"): ("a chinese temple among trees on a sunny day",
                                               "a traditional pagoda roof with green trees"),
    ("sklearn", "datasets/images/flower.jpg"): ("a pink flower with a yellow centre",
                                                "close up of a blooming flower in a garden"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"): ("portrait of a woman in a navy uniform",
                                                              "an old photo of an officer with a flag behind her"),
}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install scikit-image scikit-learn matplotlib)")
    return Path(list(spec.submodule_search_locations)[0])


def photo_paths() -> dict[Path, tuple[str, str]]:
    """Each photograph's file -> its two captions; a photograph a package version lacks is left out."""
    out = {}
    for (pkg, rel), captions in PHOTOS.items():
        path = package_dir(pkg) / rel
        if path.is_file():
            out[path] = captions
    return out


def write_csv(out: str | Path) -> Path:
    """Copy the photographs to `out/images/` and write `out/photos.csv` (image, caption); returns the CSV."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for path, captions in photo_paths().items():
        name = f"{path.parent.name}_{path.name}" if path.parent.name != "data" else path.name
        shutil.copyfile(path, out / "images" / name)
        rows += [{"image": f"images/{name}", "caption": c} for c in captions]
    csv_path = out / "photos.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    return csv_path


if __name__ == "__main__":
    print(write_csv(sys.argv[1] if len(sys.argv) > 1 else "photos"))
