"""Images named in data files: resolution against the data root, up-front checks, bounded decoding.

A record's image fields hold a path relative to the data file, an absolute path, or an `s3://` URI.
Local paths must stay inside the data file's directory (symlinks are followed before the check)
unless the config sets `allow_images_outside_data_root: true`.

Records are checked when they are read (cheaply: a PNG's chunk checksums, a JPEG decoded at 1/8
scale), so a missing, truncated or non-image file is reported as `data.jsonl:LINE: reason`.
Pixels are decoded later, in the collate step that runs in DataLoader workers. Every image's size is checked against
MAX_IMAGE_PIXELS before its pixels are decoded, so a decompression bomb is refused with a clear
error instead of PIL's warning (or a machine out of memory).
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vembed.artifacts import storage
from vembed.artifacts.storage import S3_SCHEME, is_s3
from vembed.data.records import LIST_FIELDS, Record, RecordRejected
from vembed.errors import first_line

# 64 MiB of pixels (8192 x 8192): above any real training photo, far below a bomb's billions.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
RETRIEVAL_MODES = ("auto", "t2t", "t2i", "i2t", "i2i")


class ImageError(RecordRejected):
    """An image reference that cannot be used."""


def resolve_image_path(path: str, root: str | os.PathLike[str] | None, allow_outside: bool = False) -> str:
    """The absolute location of an image named in a data file under `root`.

    s3:// URIs are returned unchanged. A relative path is taken relative to `root` (a local
    directory or an s3:// prefix). A local path that ends up outside `root` is refused unless
    `allow_outside` is set.
    """
    if is_s3(path) or root is None:
        return path
    if is_s3(str(root)):
        if posixpath.isabs(path):
            raise ImageError(f"image {path!r}: a local absolute path in a data file stored at {root}", "bad image path")
        base = str(root).removeprefix(S3_SCHEME).rstrip("/")
        joined = posixpath.normpath(posixpath.join(base, path))
        if not allow_outside and not (joined + "/").startswith(base + "/"):
            raise _outside(path, str(root))
        return S3_SCHEME + joined
    base = Path(root).resolve()
    try:
        full = (base / path).resolve()  # an absolute `path` stays absolute; symlinks are followed
    except (RuntimeError, OSError) as e:  # a symlink loop: RuntimeError up to Python 3.12, OSError after
        raise ImageError(f"image {path!r} cannot be resolved ({e})", "bad image path") from None
    if not allow_outside and not full.is_relative_to(base):
        raise _outside(path, str(base))
    return str(full)


def _outside(path: str, root: str) -> ImageError:
    return ImageError(
        f"image {path!r} is outside the data directory {root}; "
        "set allow_images_outside_data_root: true to allow it",
        "image outside data root",
    )


def read_image_bytes(ref: str | os.PathLike[str]) -> bytes:
    if is_s3(ref):
        return storage.read_bytes(ref)
    try:
        return Path(ref).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image {str(ref)!r} not found", "missing image") from None
    except IsADirectoryError:
        raise ImageError(f"image {str(ref)!r} is a directory", "bad image") from None
    except PermissionError:
        raise ImageError(f"image {str(ref)!r} is not readable (permission denied)", "bad image") from None
    except OSError as e:  # a name too long, a symlink loop, an I/O error
        raise ImageError(f"image {str(ref)!r} cannot be read ({e.strerror or type(e).__name__})", "bad image") from None


def _check_size(image: Image.Image, ref: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image {ref!r} is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels} (a decompression bomb?)",
            "image too large",
        )


def _open(data: bytes, ref: str, max_pixels: int) -> Image.Image:
    """Parse the header only; the size check happens before any pixel is decoded."""
    with warnings.catch_warnings():
        # PIL warns above its own limit and raises above twice that; both become our error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(
                f"image {ref!r} declares more pixels than the limit of {max_pixels} (a decompression bomb?)",
                "image too large",
            ) from None
        except UnidentifiedImageError:
            raise ImageError(f"image {ref!r} is not an image file PIL can read", "not an image") from None
        except Exception as e:  # a header cut short or malformed: OSError, SyntaxError, struct.error
            raise ImageError(f"image {ref!r} is corrupt or truncated ({first_line(e)})", "corrupt image") from None
    _check_size(image, ref, max_pixels)
    return image


def check_image(ref: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Cheap validation: readable, a known format, size within the limit, structure intact."""
    image = _open(read_image_bytes(ref), ref, max_pixels)
    try:
        if image.format == "PNG":
            image.verify()  # reads every chunk and checks its CRC, without inflating pixels
        else:
            # verify() does not read a JPEG's scan data; decoding at 1/8 scale (draft) reads all of
            # it, so a truncated file shows, for a fraction of a full decode's work.
            image.draft("RGB", (1, 1))
            image.load()
    except Exception as e:  # PIL raises many types (SyntaxError, OSError, struct.error) for bad files
        raise ImageError(f"image {ref!r} is corrupt or truncated ({first_line(e)})", "corrupt image") from None


def load_image(image: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a PIL image, a local path or an s3:// URI, fully decoded."""
    if isinstance(image, Image.Image):
        _check_size(image, "<PIL image>", max_pixels)
        return image.convert("RGB")
    ref = str(image)
    opened = _open(read_image_bytes(ref), ref, max_pixels)
    try:
        opened.load()
        return opened.convert("RGB")
    except Exception as e:  # truncated data surfaces as OSError, broken chunks as SyntaxError/ValueError
        raise ImageError(f"image {ref!r} is corrupt or truncated ({first_line(e)})", "corrupt image") from None


# --- records ---------------------------------------------------------------------------------


def detect_retrieval_mode(record: Record) -> str:
    """t2t, t2i, i2t or i2i from the fields a record has; "mixed" when a side has text and image."""
    if (record.query and record.query_image) or (record.positive and record.positive_image):
        return "mixed"
    return ("i" if record.query_image else "t") + "2" + ("i" if record.positive_image else "t")


def apply_retrieval_mode(record: Record, mode: str) -> Record:
    """Keep only the fields `mode` uses. `auto` keeps everything (a side with both text and an
    image becomes one multimodal item, which Qwen3-VL embeds and CLIP refuses)."""
    if mode == "auto":
        return record
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"unknown retrieval_mode {mode!r}; choose one of {', '.join(RETRIEVAL_MODES)}")
    q_image, p_image = mode[0] == "i", mode[2] == "i"  # e.g. t2i: text queries, image documents
    keep = {
        "query": not q_image,
        "query_image": q_image,
        "positive": not p_image,
        "positive_image": p_image,
        "negatives": not p_image,  # negatives take the positive's modality
        "negative_images": p_image,
    }
    if need := [name for name in ("query", "query_image", "positive", "positive_image") if keep[name] and not getattr(record, name)]:
        raise RecordRejected(f"retrieval_mode {mode} needs field {need[0]!r}", "missing field for retrieval_mode")
    return dataclasses.replace(
        record, **{name: getattr(record, name) if kept else (() if name in LIST_FIELDS else None) for name, kept in keep.items()}
    )


@dataclasses.dataclass
class RecordImages:
    """`read_records(..., transform=RecordImages(root))`: applies the retrieval mode, resolves every
    image path against the data root and checks each local image, so a bad one is reported with
    the data file's line. s3:// images are checked when they are read (a request per image up
    front would be slow)."""

    root: str | os.PathLike[str]
    retrieval_mode: str = "auto"
    allow_outside: bool = False

    def _image(self, path: str | None) -> str | None:
        if path is None:
            return None
        resolved = resolve_image_path(path, self.root, self.allow_outside)
        if not is_s3(resolved):
            try:
                check_image(resolved)
            except ImageError as e:
                # Name the path as written in the data file; the line number comes from the reader.
                raise ImageError(str(e).replace(repr(resolved), repr(path), 1), e.kind) from None
        return resolved

    def __call__(self, record: Record) -> Record:
        record = apply_retrieval_mode(record, self.retrieval_mode)
        return dataclasses.replace(
            record,
            query_image=self._image(record.query_image),
            positive_image=self._image(record.positive_image),
            negative_images=tuple(self._image(p) for p in record.negative_images),  # type: ignore[misc]
        )
