"""What makes fetched bytes right: published checksums where they exist, else their content.

Every check raises :class:`WrongBytes` with what differs; the caller deletes the bytes and fetches
them once more. Annotation files name the images to fetch, so their check also guards the paths
(``<image folder>/<file name>``, nothing that could climb out of the data root).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Union
from xml.etree import ElementTree as ET

from PIL import Image

from .catalog import Source
from .errors import WrongBytes


def digests(data: Union[bytes, Path]) -> tuple[str, str]:
    """SHA-256 (what the manifest records) and MD5 (what some sources publish) of bytes or a file."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    if isinstance(data, bytes):
        sha256.update(data)
        md5.update(data)
    else:
        with open(data, "rb") as f:
            while chunk := f.read(1 << 20):
                sha256.update(chunk)
                md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def check_digests(source: Source, data: Union[bytes, Path]) -> str:
    """The SHA-256 of ``data``, after comparing its checksums with the catalogue's."""
    sha256, md5 = digests(data)
    for name, published, actual in (("SHA-256", source.sha256, sha256), ("MD5", source.md5, md5)):
        if published is not None and actual != published.lower():
            raise WrongBytes(f"{source.file}: {name} {actual} differs from the published {published}")
    return sha256


def check_content(source: Source, data: bytes, image_folder: str) -> Any:
    """The parsed file: for ``annotations`` the image names (``<image_folder>/<name>``) it lists, in order."""
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WrongBytes(f"{source.file}: not valid JSON ({error})") from None
    if source.kind == "annotations":
        return _annotation_images(source, parsed, image_folder)
    if source.kind == "captions":
        _check_captions(source, parsed)
    elif not isinstance(parsed, dict):
        raise WrongBytes(f"{source.file}: expected a JSON object, got a {type(parsed).__name__}")
    return parsed


def _annotation_images(source: Source, entries: Any, image_folder: str) -> list[str]:
    if not isinstance(entries, list):
        raise WrongBytes(f"{source.file}: expected a BLIP/LAVIS list of {{'image', 'caption': [...]}}")
    images = []
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("caption"), list)):
            raise WrongBytes(f"{source.file}: an entry is not {{'image', 'caption': [...]}}: {entry!r:.120}")
        folder, _, name = str(entry.get("image", "")).rpartition("/")
        if folder != image_folder or not _plain_name(name):
            raise WrongBytes(f"{source.file}: image {entry.get('image')!r:.120} is not {image_folder}/<file name>")
        images.append(f"{folder}/{name}")
    _check_count(source, len(set(images)), "images")
    if len(set(images)) != len(images):
        raise WrongBytes(f"{source.file}: lists an image more than once")
    return images


def _check_captions(source: Source, captions: Any) -> None:
    if not isinstance(captions, dict) or not all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in captions.values()
    ):
        raise WrongBytes(f"{source.file}: expected FG captions {{image: [caption, ...]}}")
    _check_count(source, len(captions), "images")


def _check_count(source: Source, count: int, what: str) -> None:
    if source.images is not None and count != source.images:
        raise WrongBytes(
            f"{source.file}: {count} {what} where the published file has {source.images} "
            "(a mirror of another version gives its counts with --catalog)"
        )


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "\\" not in name and "\x00" not in name


def check_image(data: bytes, name: str) -> None:
    """The image decodes to its last pixel row (JPEG decoded at 1/8 scale: the entropy-coded data is
    still read whole, so a truncated or damaged file fails)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (max(image.width // 8, 1), max(image.height // 8, 1)))
            image.load()
    except Exception as error:  # PIL raises many types for damaged data
        raise WrongBytes(f"{name}: not a decodable image ({error})") from None


def check_entities(data: bytes, name: str) -> None:
    """Entities XML parses; a Sentences file is UTF-8 text."""
    try:
        if name.endswith(".xml"):
            ET.fromstring(data)
        else:
            data.decode("utf-8")
    except (ET.ParseError, UnicodeDecodeError) as error:
        raise WrongBytes(f"{name}: damaged ({error})") from None
