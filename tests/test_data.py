"""Tests of dreambooth_ext.data: images, captions, buckets, examples and the batch plan."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ext.config import Concept, default_config
from dreambooth_ext.data.buckets import make_buckets, nearest_bucket
from dreambooth_ext.data.captions import caption_for_image, class_caption
from dreambooth_ext.data.dataset import (
    BatchPlan,
    collect_class_examples,
    collect_examples,
    collect_instance_examples,
    find_images,
    flip_decision,
)
from dreambooth_ext.data.images import (
    fit_image,
    image_to_tensor,
    is_image_file,
    load_image,
    prepare_image,
    tensor_to_image,
)
from dreambooth_ext.errors import DreamboothError


def png(path: Path, size: tuple[int, int] = (8, 8), color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def effy() -> Concept:
    return Concept(token="effy", class_word="person", instance_prompt="{token} {class}")


# ----------------------------------------------------------------------------------------------------------
# Captions: JoePenna's README examples


@pytest.mark.parametrize("relative, expected", [
    ("img-001.jpg", "effy person"),
    ("img-001@a photo of effy.jpg", "a photo of effy"),
    ("img-001@S being a good C.jpg", "effy being a good person"),
    ("bingo/img-001.jpg", "bingo person"),
    ("bingo/img-001@S is being silly.jpg", "bingo is being silly"),
    ("bingo/dog/img-001@S being a good C.jpg", "bingo being a good dog"),
    ("effy/person/a picture of/img-001.jpg", "a picture of effy person"),
    ("bingo/dog/a photo of/in the park/img-001.jpg", "a photo of in the park bingo dog"),
    ("002-DUPLICATE@a close photo of <token> smiling wearing a black sweatshirt.png",
     "a close photo of effy smiling wearing a black sweatshirt"),
])
def test_joepenna_captions(tmp_path, relative, expected):
    image = png(tmp_path / "training_images" / relative)
    assert caption_for_image(image, tmp_path / "training_images", effy()) == expected


def test_caption_template_and_placeholders(tmp_path):
    root = tmp_path / "imgs"
    concept = Concept(token="ohwx", class_word="dog", instance_prompt="photo of {token} {class}")
    assert caption_for_image(png(root / "a.png"), root, concept) == "photo of ohwx dog"
    assert caption_for_image(png(root / "b@{token} {class} on a   beach.png"), root, concept) == "ohwx dog on a beach"
    # S and C only as whole words: not inside words, not in "U.S.", not in "S-shaped"
    image = png(root / "c@S in the U.S. with Cats and an S-shaped C.png")
    assert caption_for_image(image, root, concept) == "ohwx in the U.S. with Cats and an S-shaped dog"
    assert caption_for_image(png(root / "d@S's toy_box.png"), root, concept) == "ohwx's toy_box"


def test_sidecar_caption_wins(tmp_path):
    root = tmp_path / "imgs"
    image = png(root / "bingo" / "img@ignored caption.png")
    image.with_suffix(".txt").write_text("  S sitting on a <token> chair, a good C\n", encoding="utf-8")
    assert caption_for_image(image, root, effy()) == "bingo sitting on a bingo chair, a good person"
    # An empty sidecar falls back to the file name
    image.with_suffix(".txt").write_text("  \n", encoding="utf-8")
    assert caption_for_image(image, root, effy()) == "ignored caption"


def test_token_only_drops_class_word(tmp_path):
    root = tmp_path / "imgs"
    concept = Concept(token="effy", class_word="person", instance_prompt="photo of {token} {class}",
                      token_only=True)
    assert caption_for_image(png(root / "a.png"), root, concept) == "photo of effy"
    assert caption_for_image(png(root / "b@S being a good C.png"), root, concept) == "effy being a good"
    assert caption_for_image(png(root / "effy/person/a picture of/c.png"), root, concept) == "a picture of effy"


def test_class_caption(tmp_path):
    concept = Concept(token="ohwx", class_word="dog", class_prompt="photo of a {class}")
    assert class_caption(png(tmp_path / "0001.png"), concept) == "photo of a dog"
    assert class_caption(png(tmp_path / "0002@a C running.png"), concept) == "a dog running"
    side = png(tmp_path / "0003.png")
    side.with_suffix(".txt").write_text("a sleeping {class}", encoding="utf-8")
    assert class_caption(side, concept) == "a sleeping dog"


# ----------------------------------------------------------------------------------------------------------
# Images


def test_is_image_file():
    assert is_image_file("a/B.JPG") and is_image_file("x.webp") and is_image_file(Path("y.tiff"))
    assert not is_image_file("a.txt") and not is_image_file("a.gif") and not is_image_file("jpg")


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (16, 8), (200, 0, 0)).save(path, exif=exif.tobytes())
    image = load_image(path)
    assert image.size == (8, 16) and image.mode == "RGB"
    config = default_config(resolution=128, aspect_ratio_buckets=True,
                            concepts=[{"instance_dir": str(tmp_path)}])
    (example,) = collect_instance_examples(config)
    assert example.size[1] > example.size[0]  # the bucket is tall, like the upright picture


def save_mode(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


def test_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    loaded = load_image(save_mode(tmp_path / "rgba.png", rgba))
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (255, 0, 0)

    half = Image.new("LA", (2, 2), (0, 128))  # half-transparent black on white -> mid gray
    gray = load_image(save_mode(tmp_path / "la.png", half)).getpixel((0, 0))
    assert all(120 <= v <= 135 for v in gray)

    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    p_path = tmp_path / "p.png"
    palette.save(p_path, transparency=0)
    loaded = load_image(p_path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 1)) == (0, 255, 0)

    assert load_image(save_mode(tmp_path / "l.png", Image.new("L", (2, 2), 77))).getpixel((0, 0)) == (77, 77, 77)

    cmyk = load_image(save_mode(tmp_path / "cmyk.tif", Image.new("CMYK", (2, 2), (0, 255, 255, 0))))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0)) == (255, 0, 0)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896], [65535, 16448]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored and read as 16-bit
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((1, 0)) == (128, 128, 128)
    assert loaded.getpixel((0, 1)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (64, 64, 64)


def test_float_image_is_scaled(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F").save(path)
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_unreadable_image_raises_naming_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DreamboothError, match="broken.png"):
        load_image(bad)


@pytest.mark.parametrize("src, dst", [((100, 50), (32, 32)), ((10, 40), (64, 32)), ((64, 64), (64, 64)),
                                      ((7, 5), (128, 64))])
def test_fit_image_sizes(src, dst):
    image = Image.new("RGB", src, (1, 2, 3))
    assert fit_image(image, *dst).size == dst
    generator = torch.Generator().manual_seed(0)
    assert fit_image(image, *dst, crop="random", generator=generator).size == dst


def test_center_and_random_crop():
    # Left half black, right half white, 2:1 -> a square center crop is half black, half white
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, 32:] = 255
    image = Image.fromarray(array)
    center = np.asarray(fit_image(image, 32, 32))
    assert center[:, :15].max() == 0 and center[:, 17:].min() == 255
    offsets = set()
    for seed in range(20):
        crop = np.asarray(fit_image(image, 32, 32, crop="random", generator=torch.Generator().manual_seed(seed)))
        offsets.add(int((crop[0, :, 0] == 0).sum()))
    assert len(offsets) > 3  # the crop really moves
    same = [np.asarray(fit_image(image, 32, 32, "random", torch.Generator().manual_seed(5))) for _ in range(2)]
    assert np.array_equal(*same)
    with pytest.raises(ValueError, match="crop"):
        fit_image(image, 32, 32, crop="top")


def test_tensor_range_and_round_trip():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    array[0, 0] = (0, 128, 255)
    tensor = image_to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, 6, 10) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[0, 0, 0] == -1 and tensor[2, 0, 0] == 1
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), array)
    clamped = tensor_to_image(torch.full((3, 2, 2), 5.0))
    assert clamped.getpixel((0, 0)) == (255, 255, 255)


def test_prepare_image_flip(tmp_path):
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = 255
    path = tmp_path / "half.png"
    Image.fromarray(array).save(path)
    plain = prepare_image(path, (8, 8), "center", flip=False)
    flipped = prepare_image(path, (8, 8), "center", flip=True)
    assert plain.shape == (3, 8, 8)
    assert plain[0, 0, 0] == 1 and flipped[0, 0, 0] == -1
    assert torch.equal(flipped, plain.flip(-1))


# ----------------------------------------------------------------------------------------------------------
# Finding and collecting examples


def test_find_images_recursive_sorted_skips_hidden(tmp_path):
    png(tmp_path / "b.png")
    png(tmp_path / "a.jpg")
    png(tmp_path / "sub" / "c.webp")
    png(tmp_path / ".hidden.png")
    png(tmp_path / ".cache" / "d.png")
    (tmp_path / "notes.txt").write_text("x")
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.jpg", "b.png", "sub/c.webp"]


def test_collect_skips_unreadable_with_warning(tmp_path, caplog):
    png(tmp_path / "good.png")
    png(tmp_path / "bingo" / "good2@S smiling.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    full = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(full)
    full.write_bytes(full.read_bytes()[:200])
    config = default_config(resolution=64, concepts=[{"instance_dir": str(tmp_path), "token": "effy"}])
    with caplog.at_level(logging.WARNING):
        examples = collect_instance_examples(config)
    assert [e.path.name for e in examples] == ["good2@S smiling.png", "good.png"]
    assert [e.caption for e in examples] == ["bingo smiling", "photo of effy person"]
    assert all(e.size == (64, 64) and not e.is_class and e.concept == 0 for e in examples)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "broken.png" in warnings and "truncated.jpg" in warnings and "good.png" not in warnings


def test_no_usable_images_raises(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"nope")
    (tmp_path / "readme.txt").write_text("hi")
    config = default_config(concepts=[{"instance_dir": str(tmp_path)}])
    with pytest.raises(DreamboothError, match=str(tmp_path)) as info:
        collect_instance_examples(config)
    assert ".png" in str(info.value) and ".jpg" in str(info.value)


def test_missing_instance_dir_names_concept(tmp_path):
    png(tmp_path / "ok" / "a.png")
    missing = tmp_path / "nope"
    config = default_config(concepts=[{"instance_dir": str(tmp_path / "ok")}, {"instance_dir": str(missing)}])
    with pytest.raises(DreamboothError, match=r"concepts\[1\]") as info:
        collect_instance_examples(config)
    assert str(missing) in str(info.value)


def test_hold_out_photos_keeps_one_in_8_of_a_concept_out_of_training(tmp_path):
    for i in range(17):
        png(tmp_path / "many" / f"{i:02d}.png")
    for i in range(7):
        png(tmp_path / "few" / f"{i}.png")
    concepts = [{"instance_dir": str(tmp_path / "many")}, {"instance_dir": str(tmp_path / "few"), "token": "zwx"}]
    config = default_config(resolution=64, concepts=concepts, hold_out_photos=True)
    training, held = collect_examples(config)
    assert [(e.concept, e.path.name) for e in held] == [(0, "07.png"), (0, "15.png")]
    assert len(training) == 15 + 7 and not {e.path for e in held} & {e.path for e in training}
    assert collect_instance_examples(config) == training  # every other reader of the photos trains on these
    everything = collect_examples(default_config(resolution=64, concepts=concepts))
    assert len(everything[0]) == 24 and everything[1] == []  # off by default


def test_validation_dir_photos_are_held_out_and_captioned_as_training_photos(tmp_path):
    png(tmp_path / "photos" / "a.png")
    png(tmp_path / "held" / "b.png")
    png(tmp_path / "held" / "c@ohwx dog on a sofa.png")
    config = default_config(resolution=64, validation_dir=str(tmp_path / "held"),
                            concepts=[{"instance_dir": str(tmp_path / "photos"), "token": "ohwx", "class_word": "dog"}])
    training, held = collect_examples(config)
    assert [e.path.name for e in training] == ["a.png"]
    assert [(e.path.name, e.caption, e.concept, e.is_class, e.size) for e in held] == [
        ("b.png", "photo of ohwx dog", 0, False, (64, 64)), ("c@ohwx dog on a sofa.png", "ohwx dog on a sofa", 0,
                                                              False, (64, 64))]
    (tmp_path / "held" / "b.png").write_bytes(b"broken")
    (tmp_path / "held" / "c@ohwx dog on a sofa.png").unlink()
    with pytest.raises(DreamboothError, match="validation_dir .* holds no readable image"):
        collect_examples(config)


def test_the_dataset_check_says_when_hold_out_photos_holds_none_out(tmp_path):
    from dreambooth_ext.data.checks import check_dataset
    from dreambooth_ext.models.tokenizer import load_tokenizer

    for i in range(7):
        png(tmp_path / f"{i}.png", color=(30 * i, 20, 30))
    config = default_config(resolution=64, hold_out_photos=True, concepts=[{"instance_dir": str(tmp_path)}])
    warnings = check_dataset(config, tokenizer=load_tokenizer()).warnings
    assert any("hold_out_photos is on but it has 7 photos, fewer than 8, so none is held out" in w for w in warnings)
    png(tmp_path / "7.png", color=(250, 20, 30))
    assert not any("hold_out_photos" in w for w in check_dataset(config, tokenizer=load_tokenizer()).warnings)


def test_bucketed_sizes(tmp_path):
    png(tmp_path / "wide.png", (200, 100))
    png(tmp_path / "square.png", (50, 50))
    config = default_config(resolution=128, aspect_ratio_buckets=True, concepts=[{"instance_dir": str(tmp_path)}])
    sizes = {e.path.name: e.size for e in collect_instance_examples(config)}
    assert sizes["square.png"] == (128, 128)
    assert sizes["wide.png"][0] > sizes["wide.png"][1]


def test_collect_class_examples(tmp_path):
    inst = tmp_path / "inst"
    png(inst / "a.png")
    class_a, class_b = tmp_path / "class_a", tmp_path / "class_b"
    for i in range(5):
        png(class_a / f"{i:04d}.png")
        png(class_b / f"{i:04d}.png")
    (class_a / "0000.png").write_bytes(b"bad")  # skipped, the next one takes its place
    config = default_config(resolution=64, concepts=[
        {"instance_dir": str(inst), "class_word": "dog", "num_class_images": 3},
        {"instance_dir": str(inst), "token_only": True},
    ])
    examples = collect_class_examples(config, [class_a, class_b])
    assert [e.path.name for e in examples] == ["0001.png", "0002.png", "0003.png"]
    assert all(e.is_class and e.concept == 0 and e.caption == "photo of dog" for e in examples)
    config.prior_preservation = False
    assert collect_class_examples(config, [class_a, class_b]) == []


# ----------------------------------------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize("resolution", [64, 128, 512, 768])
def test_make_buckets(resolution):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    assert len(buckets) >= (1 if resolution == 64 else 3)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= resolution * resolution
        assert min(w, h) >= min(256, resolution) or resolution < 256
        assert max(w, h) <= 2 * resolution
    assert buckets == sorted(set(buckets))


def test_nearest_bucket():
    buckets = make_buckets(512)
    wide = nearest_bucket(2000, 1000, buckets)
    assert wide[0] > wide[1] and abs(math.log(wide[0] / wide[1]) - math.log(2)) < 0.2
    tall = nearest_bucket(1000, 2000, buckets)
    assert tall == (wide[1], wide[0])
    assert nearest_bucket(300, 300, buckets) == (512, 512)
    # ties on aspect ratio go to the larger area
    assert nearest_bucket(10, 10, [(64, 64), (128, 128), (128, 64)]) == (128, 128)


# ----------------------------------------------------------------------------------------------------------
# Batch plan and determinism


def plan_sizes() -> list[tuple[int, int]]:
    return [(64, 64)] * 7 + [(128, 64)] * 4 + [(64, 128)] * 2


def test_batch_plan_covers_each_example_once_per_epoch():
    sizes = plan_sizes()
    plan = BatchPlan(sizes, batch_size=3, seed=1)
    assert plan.steps_per_epoch == 3 + 2 + 1
    for epoch in range(3):
        batches = [plan.batch(epoch * plan.steps_per_epoch + k) for k in range(plan.steps_per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
        assert all(1 <= len(b) <= 3 and len({sizes[i] for i in b}) == 1 for b in batches)
    epochs = [[plan.batch(e * plan.steps_per_epoch + k) for k in range(plan.steps_per_epoch)] for e in range(2)]
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_batch_plan_is_resumable_and_seeded():
    sizes = plan_sizes()
    run = BatchPlan(sizes, 2, seed=7)
    uninterrupted = [run.batch(i) for i in range(40)]
    resumed = BatchPlan(sizes, 2, seed=7)
    assert [resumed.batch(i) for i in range(25, 40)] == uninterrupted[25:]
    assert [resumed.batch(i) for i in range(5)] == uninterrupted[:5]
    other = BatchPlan(sizes, 2, seed=8)
    assert [other.batch(i) for i in range(40)] != uninterrupted


def test_flips_are_deterministic():
    decisions = [flip_decision(3, i, i % 5, 0.3) for i in range(2000)]
    assert decisions == [flip_decision(3, i, i % 5, 0.3) for i in range(2000)]
    assert 0.25 < sum(decisions) / len(decisions) < 0.35
    assert not any(flip_decision(3, i, 0, 0.0) for i in range(100))
    assert all(flip_decision(3, i, 0, 1.0) for i in range(100))
    assert decisions != [flip_decision(4, i, i % 5, 0.3) for i in range(2000)]


