"""PNG bytes -> uint8 RGB arrays for the readers: pyspng (libspng) where it is installed, else PIL.

Which decoder: pyspng decodes repa's 256 px shard images in about half PIL's time (it is what
REPA's own dataset.py uses when installed); PIL is the fallback where pyspng has no wheel (Linux on
ARM, Intel macOS). `png_decoder()` says which one this process uses; the environment variable
REPA_PNG_DECODER=pil|pyspng overrides the choice (pyspng must then be installed).

Safety on bad data (tests/test_data_stream.py decodes each case in a subprocess with both):
- Every chunk's CRC is checked here before decoding (zlib.crc32 over the file, ~3% of a pyspng
  decode at 256 px). pyspng is built with libspng's CRC checks off: a flipped byte in the
  image data otherwise decoded "successfully" to wrong pixels; PIL does not check the CRCs of the
  image data either. A bad CRC, a truncated file, damaged image data or anything that is not a
  PNG (a JPEG named .png) raises ValueError, which the training stream counts as a skipped sample.
- Grayscale, grayscale + alpha, palette, RGBA and 1 x 1 images come out as (H, W, 3) uint8, equal
  between the two decoders (alpha dropped, not composited, as PIL's convert("RGB") does).
- 16-bit PNGs (never written by `repa data build`) differ: libspng scales to 8 bits, PIL clips.
"""

from __future__ import annotations

import io
import os
import zlib

import numpy as np

try:
    import pyspng
except ImportError:  # no wheel for this platform: PIL decodes
    pyspng = None

DECODERS = ("pyspng", "pil")
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _choose_decoder() -> str:
    chosen = os.environ.get("REPA_PNG_DECODER", "").strip().lower()
    if chosen:
        if chosen not in DECODERS:
            raise ValueError(f"REPA_PNG_DECODER={chosen!r}: expected one of {', '.join(DECODERS)}")
        if chosen == "pyspng" and pyspng is None:
            raise ValueError("REPA_PNG_DECODER=pyspng but pyspng is not installed (pip install pyspng)")
        return chosen
    return "pyspng" if pyspng is not None else "pil"


DECODER = _choose_decoder()


def png_decoder(decoder: str | None = None) -> str:
    """The decoder in use, with its version: e.g. "pyspng 0.1.4 (chunk CRCs checked)"."""
    decoder = decoder or DECODER
    if decoder == "pyspng":
        return f"pyspng {getattr(pyspng, '__version__', '?')} (chunk CRCs checked)"
    import PIL

    return f"pil {PIL.__version__} (chunk CRCs checked)"


def check_png(data: bytes | memoryview) -> None:
    """ValueError unless `data` is a complete PNG whose chunks all carry correct CRCs."""
    view = memoryview(data)
    if bytes(view[:8]) != _SIGNATURE:
        raise ValueError(f"not PNG data (starts with {bytes(view[:8])!r})")
    position, end = 8, len(view)
    crc32, from_bytes = zlib.crc32, int.from_bytes
    while True:
        if position + 12 > end:
            raise ValueError(f"truncated PNG: no IEND chunk in {end} bytes")
        length = from_bytes(view[position : position + 4], "big")
        data_end = position + 8 + length
        if data_end + 4 > end:
            raise ValueError(f"truncated PNG: a chunk of {length} bytes at byte {position} runs past {end}")
        kind = bytes(view[position + 4 : position + 8])
        if crc32(view[position + 4 : data_end]) != from_bytes(view[data_end : data_end + 4], "big"):
            raise ValueError(f"PNG chunk {kind!r} at byte {position}: CRC mismatch (damaged data)")
        if kind == b"IEND":
            return
        position = data_end + 4


def decode_png(data: bytes, flip: bool = False, decoder: str | None = None) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, 3), C-contiguous, mirrored left-right when `flip`.

    `decoder`: "pyspng" or "pil" (default: `png_decoder()`'s choice). Raises ValueError for data
    that is damaged or not a PNG (see the module docstring).

    Not torchvision.io.decode_png: it crashed the process with SIGSEGV on a PNG with damaged IDAT
    data (torchvision 0.29.1), which would kill a loader worker instead of letting it skip.
    """
    decoder = decoder or DECODER
    check_png(data)
    if decoder == "pyspng":
        try:
            image = pyspng.load(data, "RGB")
        except RuntimeError as exn:  # pyspng reports every decoding failure as RuntimeError
            raise ValueError(str(exn)) from exn
        if flip:
            # As 3-byte items: numpy then copies whole pixels instead of one channel at a time.
            height, width = image.shape[:2]
            pixels = image.view(np.dtype((np.void, 3))).reshape(height, width)
            image = np.ascontiguousarray(pixels[:, ::-1]).view(np.uint8).reshape(height, width, 3)
        return image
    if decoder != "pil":
        raise ValueError(f"decoder {decoder!r}: expected one of {', '.join(DECODERS)}")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            if flip:  # PIL flips before the array copy: flipping a numpy view made it slower
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return np.asarray(image)
    except (OSError, SyntaxError) as exn:  # PIL's errors for damaged data
        raise ValueError(str(exn)) from exn
