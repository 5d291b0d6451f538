"""Shared fixtures: tiny pyramidal TIFFs written on the fly, and the real Aperio test slide."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

SHARED_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "cmu-1-small-region.svs"


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A pink tissue rectangle with purple dots on white, so that every level has texture."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 242, dtype=np.uint8)
    y0, y1, x0, x1 = height // 4, 3 * height // 4, width // 5, 4 * width // 5
    image[y0:y1, x0:x1] = (225, 150, 190)
    for _ in range(max(4, height * width // 2000)):
        y, x = rng.integers(y0, y1 - 3), rng.integers(x0, x1 - 3)
        image[y : y + 3, x : x + 3] = (110, 60, 150)
    return image


def write_tiff(
    path: Path,
    image: np.ndarray,
    downsamples: tuple[int, ...] = (1, 4),
    tile: int = 64,
    compression: str | tuple = "jpeg",
    mpp: float | None = 0.5,
    **kwargs,
) -> Path:
    """Write ``image`` as a tiled pyramid, each reduced level a top-level page with NewSubfileType 1."""
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for i, ds in enumerate(downsamples):
            h, w = image.shape[0] // ds, image.shape[1] // ds
            level = image[: h * ds, : w * ds].reshape(h, ds, w, ds, -1).mean(axis=(1, 3)).astype(image.dtype)
            extra = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}
            tif.write(
                level.squeeze(-1) if level.shape[-1] == 1 else level,
                tile=(tile, tile),
                compression=compression,
                subfiletype=0 if i == 0 else 1,
                **extra,
                **kwargs,
            )
    return path


@pytest.fixture
def tiny_slide(tmp_path: Path) -> Path:
    """A 1024 x 768 JPEG pyramid (downsamples 1, 4) with mpp 0.5."""
    return write_tiff(tmp_path / "tiny.tif", scene(768, 1024))


@pytest.fixture
def aperio_slide(tmp_path: Path) -> Path:
    """A copy of the real Aperio SVS from shared/testdata."""
    if not SHARED_SLIDE.exists():
        pytest.skip("shared/testdata is not beside the project")
    return Path(shutil.copy(SHARED_SLIDE, tmp_path / SHARED_SLIDE.name))


def write_cohort(
    folder: Path, count: int = 8, side: int = 1024, splits: tuple[int, int, int] = (4, 2, 2)
) -> Path:
    """Tiny labelled slides with QuPath GeoJSON tumour annotations and a decathlon datalist (relative paths).

    Positive slides (odd index) hold a dark square "tumour" with its annotation; negatives an empty one.
    """
    import json

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        image = scene(side, side, seed=i)
        label = i % 2
        x0 = side * (3 + i % 3) // 10
        features = []
        if label:
            image[x0 : x0 + side // 10, x0 : x0 + side // 10] = (80, 20, 120)
            ring = [
                [x0, x0],
                [x0 + side // 10, x0],
                [x0 + side // 10, x0 + side // 10],
                [x0, x0 + side // 10],
            ]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                    "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
                }
            )
        write_tiff(folder / f"slide_{i}.tif", image, downsamples=(1, 4, 16))
        (folder / f"slide_{i}.geojson").write_text(
            json.dumps({"type": "FeatureCollection", "features": features})
        )
        entries.append({"image": f"slide_{i}.tif", "label": label, "annotation": f"slide_{i}.geojson"})
    a, b, _ = splits
    datalist = {"training": entries[:a], "validation": entries[a : a + b], "testing": entries[a + b :]}
    (folder / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return folder / "datalist.json"


TINY_OVERRIDES = {"preset": "tiny", "grid": 4, "patch_size": 16, "num_focus": 2, "batch_size": 2}
