"""data/preprocess.py: decoding with reasons, D3HR stage 1's resize + centre crop, batch conversion."""

import io

import numpy as np
import pytest
from PIL import Image

from d3hr_ray.data.digits import digits_rgb
from d3hr_ray.data.preprocess import (
    ImageError,
    convert_batch,
    decode_image,
    image_size,
    png_batch,
    resize_center_crop,
    to_model_input,
    training_rows,
)


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "item, reason",
    [
        (None, "no image data (null)"),
        ({"bytes": None, "path": "x"}, "no image data (null)"),
        (b"", "empty file"),
        (b"not an image at all", "not an image"),
        (encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:700], "corrupt image"),  # a cut-off JPEG
        (np.zeros((4, 4), dtype=np.float32), "pixel arrays must be uint8"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "is not (H, W)"),
    ],
)
def test_unusable_inputs_raise_image_error_with_the_reason(item, reason):
    with pytest.raises(ImageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode_image(item)


def test_grey_palette_and_rgba_inputs_become_rgb():
    for img in (Image.new("L", (5, 3), 7), Image.new("P", (5, 3)), Image.new("RGBA", (5, 3), (1, 2, 3, 4))):
        out = decode_image({"bytes": encoded(img), "path": None})
        assert out.mode == "RGB" and out.size == (5, 3)
    assert decode_image(np.full((2, 3), 9, dtype=np.uint8)).getpixel((0, 0)) == (9, 9, 9)


def test_resize_center_crop_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)  # H 30, W 50
    img = Image.fromarray(arr)
    out = np.asarray(resize_center_crop(img, 12))
    # Shorter side 30 -> 12: scale 0.4, width 50 -> 20; then the middle 12 of 20 columns (4..15).
    want = np.asarray(img.resize((20, 12), Image.Resampling.BICUBIC))[:, 4:16]
    np.testing.assert_array_equal(out, want)
    assert resize_center_crop(Image.fromarray(arr[:12, :12]), 12).size == (12, 12)  # already R x R: untouched


def test_model_input_scale_and_layout():
    rgb, _ = digits_rgb()
    x = to_model_input(rgb[0], 8)  # the digits are 8 x 8: no resize
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x, rgb[0].transpose(2, 0, 1) / 127.5 - 1.0, rtol=0, atol=1e-7)
    assert image_size(encoded(Image.new("RGB", (40, 25)))) == 25


def test_convert_batch_keeps_every_row_with_a_reason():
    items = [np.full((8, 8, 3), 200, dtype=np.uint8), b"junk", np.zeros((8, 8, 3), dtype=np.uint8)]
    labels = np.array([0, 1, -1])
    out, reasons = convert_batch(
        items, labels, lambda it: to_model_input(it, 8), (3, 8, 8), np.float32, unlabelled="no class"
    )
    assert out.shape == (3, 3, 8, 8)
    assert reasons[0] == "" and reasons[1].startswith("not an image") and reasons[2] == "no class"
    assert np.all(out[1] == 0) and np.all(out[2] == 0)
    np.testing.assert_allclose(out[0], 200 / 127.5 - 1.0, atol=1e-6)


def test_preprocess_batch_keeps_a_reason_the_reader_gave():
    from d3hr_ray.data.preprocess import preprocess_batch

    items = np.empty(3, dtype=object)
    items[:] = [np.zeros((8, 8, 3), dtype=np.uint8), None, np.zeros((8, 8, 3), dtype=np.uint8)]
    batch = {
        "item": items,
        "label": np.array([0, -1, 1]),
        "key": np.array(["a", "b", "c"], dtype=object),
        "reason": np.array(["", "label 12 is outside 0..9", ""], dtype=object),
    }
    out = preprocess_batch(batch, resolution=8)
    assert out["image"].shape == (3, 3, 8, 8) and out["reason"].tolist() == ["", "label 12 is outside 0..9", ""]
    np.testing.assert_allclose(out["image"][0], -1.0)


def test_training_rows_flag_refused_images_and_keep_their_place():
    batch = {
        "image": np.zeros((3, 3, 4, 4), np.float32),
        "label": np.array([0, 1, 2]),
        "reason": np.array(["", "not an image", ""]),
    }
    out = training_rows(batch)
    assert sorted(out) == ["image", "label", "ok"]
    assert out["ok"].tolist() == [True, False, True] and out["label"].tolist() == [0, 1, 2]


def test_png_batch_is_the_centre_crop_as_png_with_a_reason_for_each_refusal():
    """A wide image: its PNG holds PIL's own bicubic resize of the shorter side to 6 and centre crop, written here;
    an undecodable item and a row the reader refused get empty bytes and their reasons."""
    wide = Image.effect_noise((30, 12), 60).convert("RGB")
    items = np.empty(3, dtype=object)
    items[:] = [encoded(wide), b"not an image at all", encoded(wide)]
    batch = {"item": items, "key": np.array(["a", "b", "c"], dtype=object), "reason": np.array(["", "", "gone"])}
    out = png_batch(batch, size=6)
    assert out["key"].tolist() == ["a", "b", "c"] and out["reason"][0] == "" and out["reason"][2] == "gone"
    assert "not an image" in out["reason"][1]
    assert out["png"][1] == b"" and out["png"][2] == b""
    resized = wide.resize((15, 6), Image.Resampling.BICUBIC)  # 30 x 12 -> shorter side 6
    expected = np.asarray(resized.crop((4, 0, 10, 6)))  # (15 - 6) // 2 = 4
    got = np.asarray(Image.open(io.BytesIO(out["png"][0])))
    np.testing.assert_array_equal(got, expected)  # PNG is lossless
