"""Small offline image-classification datasets as ``datasets.DatasetDict`` (train/validation/test).

Online users pass ``--dataset_name`` and get the Hub's loaders; these exist so that the
quickstart, the tests and the benchmarks run with no network. The checks at the end are the recipe's data
wrappers': an unreadable image file or a label the model has no class for, named with the fix.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot")


def _split(images: np.ndarray, labels: np.ndarray, fractions: tuple[float, float], seed: int):
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val, n_test = (int(round(f * len(labels))) for f in fractions)
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return (images[train], labels[train]), (images[val], labels[val]), (images[test], labels[test])


def _dataset(images: np.ndarray, labels: np.ndarray, label_names, channels: int = 1) -> Dataset:
    """Images in [0, 1] of shape (n, 1, H, W) -> a torch-formatted Dataset normalised to [-1, 1], the grey channel
    repeated ``channels`` times (3: RGB, what ``pipeline()`` gives a model)."""
    pixels = ((images.astype(np.float32) - 0.5) / 0.5).astype(np.float32)
    if channels != 1:
        pixels = np.repeat(pixels, channels, axis=1)
    features = Features(
        {"pixel_values": Array3D(shape=pixels.shape[1:], dtype="float32"), "labels": ClassLabel(names=list(label_names))}
    )
    dataset = Dataset.from_dict({"pixel_values": pixels, "labels": labels.astype(np.int64)}, features=features)
    return dataset.with_format("torch")


def load_digits_dataset(seed: int = 0, validation_fraction: float = 0.15, test_fraction: float = 0.15,
                        channels: int = 1) -> DatasetDict:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as ``channels``x8x8 tensors (grey repeated)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0)[:, None, :, :]
    train, val, test = _split(images, digits.target, (validation_fraction, test_fraction), seed)
    names = [str(i) for i in range(10)]
    return DatasetDict(
        train=_dataset(*train, names, channels), validation=_dataset(*val, names, channels),
        test=_dataset(*test, names, channels)
    )


def builtin_image_processor(dataset):
    """An image processor that turns a PIL image into the ``pixel_values`` of a built-in dataset.

    The built-in splits hold images already scaled to [0, 1] and normalised to [-1, 1]
    (``(x - 0.5) / 0.5``) at their own size, with 1 channel or (the recipe's) the grey one repeated
    as RGB; this processor does the same to an 8-bit image of as many channels (rescale by 1/255,
    normalise with mean 0.5 and std 0.5). ``pipeline("image-classification", model=output_dir)``
    converts every image to RGB, so a 3-channel split's model takes what it gives: a grey image
    becomes exactly the training pixels.
    """
    from transformers import ViTImageProcessor

    try:  # transformers' default backend needs torchvision; the PIL one gives the same pixels
        import torchvision  # noqa: F401
    except ImportError:
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    channels, height, width = dataset.features["pixel_values"].shape
    return ViTImageProcessor(do_resize=True, size={"height": height, "width": width}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * channels,
                             image_std=[0.5] * channels)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        _, dtype, ndim = struct.unpack(">HBB", handle.read(4))
        shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
        return np.frombuffer(handle.read(), dtype=np.uint8).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in sorted(directory.glob(f"{stem}*")):
        return candidate
    raise FileNotFoundError(
        f"{stem}* not found in {directory}. Install Fashion-MNIST with "
        f"`apt-get install -y dataset-fashion-mnist`, or pass its directory."
    )


def load_fashion_mnist(directory: str | Path = FASHION_MNIST_DIR, validation_size: int = 6000, seed: int = 0,
                       max_train_samples: int | None = None, channels: int = 1) -> DatasetDict:
    """Fashion-MNIST (28x28 grey, the channel repeated ``channels`` times) from the Debian package's IDX files.

    The validation split is carved from the 60,000 training images (for choosing hyperparameters);
    the test split is the official 10,000 test images.
    """
    directory = Path(directory)
    train_images = _read_idx(_find(directory, "train-images"))[:, None] / 255.0
    train_labels = _read_idx(_find(directory, "train-labels"))
    test_images = _read_idx(_find(directory, "t10k-images"))[:, None] / 255.0
    test_labels = _read_idx(_find(directory, "t10k-labels"))
    order = np.random.default_rng(seed).permutation(len(train_labels))
    val, train = order[:validation_size], order[validation_size:]
    if max_train_samples is not None:
        train = train[:max_train_samples]
    return DatasetDict(
        train=_dataset(train_images[train], train_labels[train], FASHION_MNIST_LABELS, channels),
        validation=_dataset(train_images[val], train_labels[val], FASHION_MNIST_LABELS, channels),
        test=_dataset(test_images, test_labels, FASHION_MNIST_LABELS, channels),
    )


def imagefolder_class_name(label: str) -> str:
    """The directory :func:`write_imagefolder` gives a class (a ``/`` in the name becomes ``-``)."""
    return label.replace("/", "-")


def write_imagefolder(split: Dataset, directory: str | Path) -> Path:
    """Write a built-in split as an imagefolder, ``directory/<class name>/<index>.png`` (8-bit images).

    The form in which ImageNet-size data usually arrives: ``--train_dir`` reads it, and
    ``--streaming`` streams it instead of loading it. A class name's ``/`` becomes ``-``.
    """
    from PIL import Image

    directory = Path(directory)
    names = split.features["labels"].names
    columns = split.with_format("numpy")[:]
    pixels, labels = columns["pixel_values"], columns["labels"]
    images = np.clip(np.rint((pixels * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)  # undo _dataset's scaling
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = directory / imagefolder_class_name(names[int(label)])
        folder.mkdir(parents=True, exist_ok=True)
        array = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        Image.fromarray(array).save(folder / f"{index}.png")
    return directory


# --------------------------------------------------------------------------- checks the recipe's data wrappers make


def split_name(dataset, fallback: str) -> str:
    """The split ``dataset`` says it is (``train``, ``validation``, ...), else ``fallback``, for error messages."""
    split = getattr(dataset, "split", None)
    return str(split) if split else fallback


def undecoded_images(dataset, column: str):
    """(dataset with ``column`` left undecoded, its ``datasets.Image`` feature or None).

    ``datasets`` decodes images as it reads them and a file PIL cannot read (a truncated PNG) then stops the run
    with "image file is truncated" and no file name; decoding in :func:`decode_image` instead names it. Casting
    the decoding off is cheap (no data is rewritten) and lazy for a stream.
    """
    from datasets import Image

    feature = (dataset.features or {}).get(column)
    if not isinstance(feature, Image) or not feature.decode:
        return dataset, None
    return dataset.cast_column(column, Image(mode=feature.mode, decode=False)), feature


def decode_image(feature, value, index: int, split: str, token_per_repo_id=None):
    """``value`` ({"path", "bytes"}) decoded as ``datasets`` would; a file it cannot read is named, with the fix."""
    try:
        return feature.decode_example(value, token_per_repo_id=token_per_repo_id)
    except (OSError, SyntaxError, ValueError) as error:  # PIL: truncated, not an image, unknown format
        path = value.get("path") if isinstance(value, dict) else None
        where = f"image file {path} (example {index} of the {split} split)" if path else \
            f"the image of example {index} of the {split} split"
        raise ValueError(f"cannot read {where}: {type(error).__name__}: {error}. Replace the file with a readable "
                         f"image or delete it, then run again.") from None


def _label_fix(num_labels: int) -> str:
    return (f"Labels must be class ids 0..{num_labels - 1} (or class names): pass --label_column_name with the column "
            f"that holds them, a labelled split as --validation_split_name (an unlabelled split marks its labels -1), "
            f"or a model whose head has as many classes (--ignore_mismatched_sizes true trains a new one).")


def check_label(label: int, num_labels: int, index: int, split: str) -> None:
    """Refuse a label the classifier has no class for (torch's "Target 5 is out of bounds" mid-run otherwise)."""
    if not 0 <= label < num_labels:
        raise ValueError(f"label {label} of example {index} of the {split} split is not a class of the model, which "
                         f"classifies {num_labels} classes. {_label_fix(num_labels)}")


def check_labels(dataset, column: str, num_labels: int, split: str) -> None:
    """:func:`check_label` for every example of an in-memory split at once (the label column only is read)."""
    labels = np.asarray(dataset.select_columns([column]).with_format("numpy")[column])
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if len(bad):
        first = int(bad[0])
        values = sorted({int(value) for value in labels[bad]})
        raise ValueError(f"{len(bad)} label(s) of the {split} split are not classes of the model, which classifies "
                         f"{num_labels} classes: {', '.join(map(str, values[:10]))} (the first at example {first}). "
                         f"{_label_fix(num_labels)}")
