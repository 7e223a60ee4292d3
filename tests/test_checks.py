"""The dataset check: each mistake found before any model loads, said once with what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dreambooth_ext.config import from_dict
from dreambooth_ext.data.checks import check_dataset
from dreambooth_ext.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def photos(folder: Path, count: int = 3, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (30 * i, 200 - 40 * i, 90))
        image.paste((250, 250, 0), (5 + 3 * i, 5, size // 2, size // 2))
        image.save(folder / f"img{i}.png")
    return folder


def config(folder: Path, **concept) -> object:
    return from_dict({"resolution": 64, "concepts": [{"instance_dir": str(folder), "token": "ohwx",
                                                      "class_word": "person", "num_class_images": 50, **concept}]})


def warnings_of(cfg, tokenizer) -> list[str]:
    report = check_dataset(cfg, tokenizer=tokenizer)
    assert not report.errors
    return report.warnings


def test_a_good_dataset_passes_quietly(tmp_path, tokenizer):
    assert warnings_of(config(photos(tmp_path / "p")), tokenizer) == []


@pytest.mark.parametrize("token, words", [
    ("person", "is the class word itself"),
    ("dog", "common word"),
    ("xyzzyqqvvb", "splits into"),
])
def test_tokens_that_cannot_work_well(tmp_path, tokenizer, token, words):
    (warning,) = warnings_of(config(photos(tmp_path / "p"), token=token), tokenizer)
    assert words in warning and "ohwx" in warning  # what to use instead


def test_token_pieces_are_counted(tmp_path, tokenizer):
    (warning,) = warnings_of(config(photos(tmp_path / "p"), token="xyzzyqqvvb"), tokenizer)
    pieces = len(tokenizer("xyzzyqqvvb", add_special_tokens=False).input_ids)
    assert f"splits into {pieces} pieces" in warning


def test_few_small_and_duplicate_images(tmp_path, tokenizer):
    folder = photos(tmp_path / "p", count=2, size=32)
    (folder / "copy.png").write_bytes((folder / "img0.png").read_bytes())
    found = warnings_of(config(folder), tokenizer)
    assert len(found) == 2 and "much smaller than the training resolution 64" in found[0]  # three 32px images
    assert "copy.png = img0.png" in found[1]
    (folder / "copy.png").unlink()
    assert any("only 2 training image(s)" in w for w in warnings_of(config(folder), tokenizer))


def test_long_captions_and_captions_without_the_class_word(tmp_path, tokenizer):
    folder = photos(tmp_path / "p")
    (folder / "img1.txt").write_text("photo of ohwx person " + "standing in a very long field of flowers " * 12)
    (folder / "img2.txt").write_text("ohwx on a beach")
    found = warnings_of(config(folder), tokenizer)
    assert any("longer than the text encoder's 75 tokens" in w and "img1.png" in w and "cut:" in w for w in found)
    assert any("without the class word (e.g. img2.png)" in w for w in found)


def test_class_images_fewer_than_training_images_or_of_another_class(tmp_path, tokenizer):
    folder = photos(tmp_path / "p", count=4)
    found = warnings_of(config(folder, num_class_images=2, class_prompt="photo of a dog"), tokenizer)
    assert any("does not name the class word 'person'" in w for w in found)
    assert any("2 class image(s) for 4 training images" in w for w in found)
    reg = photos(tmp_path / "reg", count=1)  # a regularization folder used as it is: what it holds counts
    found = warnings_of(config(folder, class_dir=str(reg), generate_class_images=False), tokenizer)
    assert any("1 class image(s) for 4 training images" in w and "add images to class_dir" in w for w in found)


def test_no_images_is_an_error(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    report = check_dataset(config(tmp_path / "empty"), tokenizer=tokenizer)
    assert report.errors and "no usable training images" in report.errors[0]


def test_the_tab_and_a_run_show_the_report(tmp_path):
    """The tab's Check dataset button, and every run (its status; the log on the command line), before any model
    loads."""
    from ui_helpers import make_models_dir

    from dreambooth_ext.config import to_dict
    from dreambooth_ext.ui import JobManager, folder_adapter
    from dreambooth_ext.ui.tab import DEFAULT_PICK, build_tab

    tab = build_tab(folder_adapter(make_models_dir(tmp_path), tmp_path / "work"), JobManager(), concept_slots=1)
    folder = photos(tmp_path / "p", count=2)
    data = to_dict(config(folder, token="dog"))
    data.update(project_name="checked", base_model=str(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors"),
                max_train_steps=1, prior_preservation=False, device="cpu", save_precision="fp32")
    values = tab.form_values(from_dict(data))
    report = tab.check_dataset(DEFAULT_PICK, *values)
    assert "Dataset check" in report and "common word" in report and "only 2 training image" in report
    status = tab.start("task(c)", DEFAULT_PICK, None, *values)[-1]
    assert "data-state='finished'" in status and "common word" in status
    assert any("common word" in w for w in tab.jobs.status()["warnings"])


def test_an_empty_regularization_folder_used_as_it_is_stops_the_run(tmp_path, tokenizer):
    report = check_dataset(config(photos(tmp_path / "p"), class_dir=str(tmp_path / "missing"),
                                  generate_class_images=False), tokenizer=tokenizer)
    assert report.errors and "holds no images" in report.errors[0]
