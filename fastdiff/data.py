"""Training data, held in memory as one tensor: images (N, C, S, S) float32 in [-1, 1], labels (N,) or None.

Every data set fastdiff trains on is small enough to live in memory (the embedded model's is 1797
8×8 digits), so there are no DataLoaders and no worker processes: a training step indexes the
tensor with indices drawn from the trainer's own generator, which keeps runs reproducible and
makes resuming exact. Pixels are mapped to [-1, 1] because the DDPM forward process assumes data
of roughly unit scale centred on zero (Ho et al. 2020, §3.3), and DDIM's ``clip_sample`` clips to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_PIL_MODES = {1: "L", 3: "RGB"}

Dataset = tuple[torch.Tensor, "torch.Tensor | None"]  # images (N, C, S, S), labels (N,) int64 or None


# ----------------------------------------------------------------------------- digits
def digits_dataset(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits: images (N, 1, S, S) in [-1, 1], labels (N,) in 0..9.

    The 8×8 originals (values 0..16) are mapped by x/8 − 1 and upsampled bilinearly: the U-Net
    halves the resolution per level, and 8×8 leaves no room for more than one downsampling.
    Bilinear weights are a convex combination, so the result stays inside [-1, 1].
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the 'digits' data set comes with scikit-learn, which is not installed; "
                          "install it with: pip install 'fastdiff[digits]'") from err
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size for the digits data set must be an int >= 16, got {image_size!r}")
    digits = load_digits()  # bundled with scikit-learn: no download
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 8 - 1  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    return images.contiguous(), labels


# ----------------------------------------------------------------------------- image folders
def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth), sorted so the data set's order is reproducible."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """One image as (C, S, S) in [-1, 1]: shorter side resized to S, then the centre square cropped."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert(_PIL_MODES[channels])
    except OSError as err:
        raise ValueError(f"dataset: cannot read image {path} ({err})") from err
    scale = image_size / min(image.size)
    width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - image_size) // 2, (height - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (S, S) or (S, S, C)
    pixels = pixels.reshape(image_size, image_size, channels).permute(2, 0, 1)
    return pixels / 127.5 - 1


def image_folder_dataset(path, image_size: int, channels: int = 3) -> Dataset:
    """Every image in a folder as (N, C, S, S) in [-1, 1], plus labels when the folder has classes.

    Layout: either images directly in ``path`` (unconditional, labels None), or one subfolder per
    class (``path/cat/*.png``, ``path/dog/*.png``): class ids are the subfolder names in sorted
    order, so they do not depend on the filesystem's listing order.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"dataset: {folder} is not a folder (expected 'digits' or a folder of images)")
    if channels not in _PIL_MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and _image_files(d))
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if class_dirs and loose:
        raise ValueError(f"dataset: {folder} mixes class subfolders with loose images ({loose[0].name}); "
                         "put every image in a class subfolder, or use no subfolders at all")
    if class_dirs:
        files = [(f, label) for label, d in enumerate(class_dirs) for f in _image_files(d)]
    else:
        files = [(f, None) for f in sorted(loose)]
    if not files:
        raise ValueError(f"dataset: no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    images = torch.stack([_load_image(f, image_size, channels) for f, _ in files])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64) if class_dirs else None
    return images, labels


def load_dataset(name_or_path, image_size: int, channels: int) -> Dataset:
    """``"digits"`` (1 channel) or a folder of images; see ``digits_dataset`` / ``image_folder_dataset``."""
    if str(name_or_path) == "digits":
        if channels != 1:
            raise ValueError(f"channels must be 1 for the digits data set (it is grayscale), got {channels!r}")
        return digits_dataset(image_size)
    return image_folder_dataset(name_or_path, image_size, channels)


def num_classes(labels: torch.Tensor | None) -> int | None:
    """How many classes a label tensor spans (ids are 0..K−1), or None for an unlabelled data set."""
    return None if labels is None else int(labels.max()) + 1
