"""read_image on every kind of file users bring, built here in tmp_path."""

import pickle

import cv2
import numpy as np
import pytest
from PIL import Image

from vision.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    exif_for_size,
    image_size,
    read_header,
    read_image,
)


def _pattern(h=6, w=8):
    """A small RGB image whose every pixel differs, so a flip or rotation cannot go unnoticed."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 30, y * 40, (x + y) * 10], axis=2).astype(np.uint8)


def _save_with_orientation(path, array, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_formats_round_trip_exactly(tmp_path, ext):
    array = _pattern()
    path = tmp_path / f"a{ext}"
    kwargs = {"lossless": True} if ext == ".webp" else {}
    Image.fromarray(array).save(path, **kwargs)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable and out.flags.c_contiguous


def test_jpeg_decodes_close_to_the_original(tmp_path):
    array = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    Image.fromarray(array).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert np.abs(out.astype(int) - array).max() <= 3


def test_grayscale_and_bilevel_become_three_equal_channels(tmp_path):
    gray = np.array([[0, 50], [128, 255]], np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)
    Image.fromarray(gray > 100).save(tmp_path / "b.png")  # mode "1"
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[:, :, 0], [[0, 0], [255, 255]])


def test_palette_image_gives_its_palette_colours(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), [[[255, 0, 0], [0, 0, 255]]])


def test_rgba_is_composited_on_neutral_grey(tmp_path):
    rgba = np.array([[[200, 100, 0, 64], [10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    # (c * a + 128 * (255 - a) + 127) // 255, by hand: 200*64 + 128*191 = 37248 -> 146, ...
    np.testing.assert_array_equal(out, [[[146, 121, 96], [10, 20, 30], [128, 128, 128]]])


def test_palette_with_transparency_is_composited(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "t.png", transparency=0)
    np.testing.assert_array_equal(read_image(tmp_path / "t.png"), [[[128, 128, 128], [0, 255, 0]]])


def test_16bit_grayscale_png_scales_full_range(tmp_path):
    values = np.array([[0, 25700, 32768, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), values)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[:, :, 0], [[0, 100, 128, 255]])


def test_16bit_rgb_png_becomes_8bit_rgb(tmp_path):
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[..., 0] = 65535  # red channel full
    rgb16[..., 2] = 257 * 10
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[:, :, ::-1])  # OpenCV writes BGR
    out = read_image(tmp_path / "c16.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [255, 0, 10])


def test_cmyk_jpeg_and_tiff_become_rgb(tmp_path):
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[..., 0] = 255  # pure cyan
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif")[0, 0], [0, 255, 255])
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert np.abs(read_image(tmp_path / "c.jpg")[0, 0].astype(int) - [0, 255, 255]).max() <= 3


@pytest.mark.parametrize(
    "orientation,expected",
    [
        (1, lambda a: a),
        (3, lambda a: a[::-1, ::-1]),
        (6, lambda a: np.rot90(a, -1)),  # "rotate 90 CW to display"
        (8, lambda a: np.rot90(a)),
    ],
)
def test_exif_orientation_applied_only_when_asked(tmp_path, orientation, expected):
    array = _pattern()
    path = tmp_path / "r.png"
    _save_with_orientation(path, array, orientation)
    np.testing.assert_array_equal(read_image(path, exif=True), expected(array))
    np.testing.assert_array_equal(read_image(path, exif=False), array)
    header = read_header(path)
    assert header.orientation == orientation and (header.width, header.height) == (8, 6)
    assert image_size(path, exif=False) == (8, 6)
    assert image_size(path) == ((6, 8) if orientation in (6, 8) else (8, 6))


def test_exif_orientation_on_a_real_jpeg(tmp_path):
    path = tmp_path / "phone.jpg"
    _save_with_orientation(path, np.zeros((10, 20, 3), np.uint8), 6)
    assert read_image(path).shape == (20, 10, 3)
    assert read_image(path, exif=False).shape == (10, 20, 3)


def test_exif_for_size_picks_the_pixels_the_annotations_match(tmp_path):
    path = tmp_path / "r.png"
    _save_with_orientation(path, _pattern(), 6)  # stored 8x6, shown 6x8
    header = read_header(path)
    assert exif_for_size(header, 6, 8) is True
    assert exif_for_size(header, 8, 6) is False
    assert exif_for_size(header, 100, 100) is None
    Image.fromarray(_pattern()).save(tmp_path / "plain.png")
    assert exif_for_size(read_header(tmp_path / "plain.png"), 8, 6) is True


def _jpeg_bytes(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    return (tmp_path / "full.jpg").read_bytes()


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        ("notes.jpg", b"hello, this is text\n", 'not an image (a text file starting "hello, t")'),
        ("blob.jpg", b"\x00\x9f\x13binary", "not an image (unknown content starting with bytes 00 9f 13 62"),
        ("anim.jpg", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "unsupported image format GIF"),
    ],
)
def test_unusable_files_raise_image_error_naming_file_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: {reason}")
    assert info.value.path == str(path) and info.value.reason.startswith(reason)
    assert isinstance(info.value, ValueError)


def test_truncated_jpeg(tmp_path):
    data = _jpeg_bytes(tmp_path)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (64, 64)  # the header is intact ...
    with pytest.raises(ImageError, match=r"cut\.jpg: truncated or corrupt image data"):
        read_image(path)  # ... the pixels are not


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match=r"bad\.png: truncated or corrupt image data"):
        read_image(tmp_path / "bad.png")


def test_missing_file_directory_and_over_size(tmp_path):
    with pytest.raises(ImageError, match=r"nothere\.png: no such file"):
        read_image(tmp_path / "nothere.png")
    with pytest.raises(ImageError, match="not a file"):
        read_image(tmp_path)
    Image.fromarray(_pattern(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png: over-size image: 100x100 = 0\.0 megapixels"):
        read_image(tmp_path / "big.png", max_pixels=9_999)
    assert read_image(tmp_path / "big.png", max_pixels=10_000).shape == (100, 100, 3)


def test_image_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageError("/data/a.jpg", "empty file (0 bytes)")))
    assert (err.path, err.reason) == ("/data/a.jpg", "empty file (0 bytes)")
    assert str(err) == "/data/a.jpg: empty file (0 bytes)"


def test_extension_list_is_lower_case_with_dots():
    assert ".jpg" in IMAGE_EXTENSIONS and ".webp" in IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
