"""The official CLI's dataset flags: Food-101's test split in meta order, class by key or name, one-line errors."""
import json
from pathlib import Path

import pytest

import solve
from treg.config import ConfigError
from treg.datasets import dataset_images, food101, input_images
from treg.images import ImageError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("target", ["ice_cream", "ice cream", "Ice cream", "  ICE   cream "])
def test_food101_class_in_meta_order_by_key_or_name(food101_dir, target):
    root, split = food101_dir
    files = food101(root, target)
    assert [f.relative_to(root / "images").with_suffix("").as_posix() for f in files] == split["ice_cream"]
    assert files != sorted(files)  # the meta order, not the sorted one


def test_food101_txt_meta_and_torchvision_parent_folder(food101_dir):
    root, split = food101_dir
    (root / "meta" / "test.json").unlink()  # only test.txt left
    files = dataset_images("food", root.parent, "fried_rice")  # the folder that holds food-101/
    assert [f.parent.name + "/" + f.stem for f in files] == split["fried_rice"]
    everything = dataset_images("food", root)
    assert len(everything) == sum(map(len, split.values())) and len(set(everything)) == len(everything)


def rel_ids(files, root):
    return [f.relative_to(root / "images").with_suffix("").as_posix() for f in files]


def test_food101_all_classes_follow_the_meta_class_order(food101_dir):
    """torchvision's Food101 walks test.json's classes in the file's key order (not sorted, not classes.txt); the
    fixture lists fried_rice, ice_cream, apple_pie, so a sorted or classes.txt order differs in its first id."""
    root, split = food101_dir
    in_meta_order = [rel for key in ("fried_rice", "ice_cream", "apple_pie") for rel in split[key]]
    assert list(split) == ["fried_rice", "ice_cream", "apple_pie"] and list(split) != sorted(split)
    assert rel_ids(food101(root), root) == in_meta_order
    (root / "meta" / "test.json").unlink()  # test.txt: classes in the order they first appear
    assert rel_ids(food101(root), root) == in_meta_order


def test_food101_json_is_read_before_txt(food101_dir):
    """With both meta files present, test.json decides (torchvision reads only the json): a test.txt that lists
    the classes in another order and one image fewer does not change the list."""
    root, split = food101_dir
    txt = [rel for key in ("apple_pie", "ice_cream", "fried_rice") for rel in split[key]][1:]
    (root / "meta" / "test.txt").write_text("".join(f"{rel}\n" for rel in txt))
    assert rel_ids(food101(root), root) == [rel for rels in split.values() for rel in rels]
    (root / "meta" / "test.json").unlink()
    assert rel_ids(food101(root), root) == txt


def bad_cases(root):
    return {
        "unknown class": (("food", root, "ice creams"), ConfigError, "did you mean ice_cream"),
        "not food-101": (("food", root / "images", None), ImageError, "not a Food-101 folder"),
        "unsupported key": (("imagenet_pair", root, None), ConfigError, "not supported"),
        "unknown key": (("celeba", root, None), ConfigError, "--dataset must be one of"),
        "target on a folder dataset": (("ffhq", root, "x"), ConfigError, "has no classes"),
        "no root": (("ffhq", None, None), ConfigError, "needs --root"),
    }


@pytest.mark.parametrize("case", ["unknown class", "not food-101", "unsupported key", "unknown key",
                                  "target on a folder dataset", "no root"])
def test_bad_dataset_arguments_are_one_line_errors(food101_dir, case):
    args, error, expected = bad_cases(food101_dir[0])[case]
    with pytest.raises(error) as info:
        dataset_images(*args)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_missing_image_listed_in_meta_is_reported(food101_dir):
    root, split = food101_dir
    (root / "images" / f"{split['ice_cream'][1]}.jpg").unlink()
    with pytest.raises(ImageError, match="1 of 3 Food-101 images are missing"):
        food101(root, "ice_cream")


def test_folder_dataset_is_every_image_recursively_sorted(food101_dir):
    root = food101_dir[0]
    files = dataset_images("imagenet1k", root / "images")
    assert files == sorted(files) and len(files) == 9 and files[0].parent.name == "apple_pie"


def test_dataset_flags_without_use_dataloader_are_an_error(food101_dir):
    with pytest.raises(ConfigError, match="need --use_dataloader"):
        input_images(Path("."), False, "food", food101_dir[0], None)


def test_solve_with_the_official_dataset_flags(food101_dir, tmp_path):
    root, split = food101_dir
    workdir = tmp_path / "out"
    solve.main(["--model", "analytic", "--use_dataloader", "--dataset", "food", "--root", str(root),
                "--target", "ice cream", "--limit", "2", "--image_size", "64",
                "--prompt", "a photography of an ice cream",
                "--workdir", str(workdir), "--device", "cpu"])
    run = json.loads((workdir / "run.json").read_text())
    assert [Path(r["path"]).parent.name + "/" + Path(r["path"]).stem for r in run["images"]] == split["ice_cream"][:2]
    assert sorted(p.name for p in (workdir / "recon").iterdir()) == [
        "00000-a photography of an ice cream.png", "00001-a photography of an ice cream.png"]


def test_solve_with_an_unknown_class_exits_with_one_line(food101_dir, tmp_path):
    with pytest.raises(SystemExit) as stop:
        solve.main(["--model", "analytic", "--use_dataloader", "--dataset", "food", "--root", str(food101_dir[0]),
                    "--target", "spaghetti", "--workdir", str(tmp_path / "out")])
    assert str(stop.value.code).startswith("error: --target 'spaghetti'") and not (tmp_path / "out").exists()


def test_folder_dataset_skips_other_files_and_folders_named_like_images(food101_dir):
    images = food101_dir[0] / "images"
    (images / "apple_pie" / "notes.txt").write_text("not an image")
    (images / "folder.jpg").mkdir()  # a folder with an image suffix
    files = dataset_images("ffhq", images)
    assert len(files) == 9 and all(f.suffix == ".jpg" and f.is_file() for f in files)


def test_folder_dataset_errors_name_the_root(tmp_path):
    with pytest.raises(ImageError, match=f"^dataset root {tmp_path / 'absent'} is not a folder$"):
        dataset_images("landscape", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ImageError) as info:
        dataset_images("landscape", tmp_path / "empty")
    assert str(info.value) == f"no images (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp) under {tmp_path / 'empty'}"


@pytest.mark.parametrize("flags", [{"dataset": "food"}, {"root": "x"}, {"target": "ice_cream"}])
def test_each_dataset_flag_alone_needs_use_dataloader(food101_dir, flags):
    with pytest.raises(ConfigError) as info:
        input_images(food101_dir[0], **flags)
    assert str(info.value) == "--dataset, --root and --target need --use_dataloader (as in the official CLI)"


def test_without_use_dataloader_the_image_path_is_read(food101_dir):
    folder = food101_dir[0] / "images" / "ice_cream"
    assert input_images(folder) == sorted(folder.iterdir())  # the default is not the dataloader
    with pytest.raises(ConfigError) as info:
        input_images(folder, True)
    assert str(info.value) == ("--use_dataloader needs --dataset (one of food, ffhq, afhq, landscape, imagenet1k, "
                               "imagenet1k_i2sb, imagenet_pair)")


def test_unreadable_or_misshapen_meta_json_is_one_line(food101_dir):
    root = food101_dir[0]
    meta = root / "meta" / "test.json"
    meta.write_text("{not json")
    with pytest.raises(ImageError) as info:
        food101(root)
    assert str(info.value).startswith(f"cannot read {meta}: Expecting property name") and "\n" not in str(info.value)
    meta.write_text("[]")
    with pytest.raises(ImageError) as info:
        food101(root)
    assert str(info.value) == f"{meta} must map each class to its image ids"


def test_unknown_dataset_key_lists_the_keys(food101_dir):
    with pytest.raises(ConfigError) as info:
        dataset_images("celeba", food101_dir[0])
    assert str(info.value) == ("--dataset must be one of food, ffhq, afhq, landscape, imagenet1k, imagenet1k_i2sb, "
                               "imagenet_pair, got 'celeba'")


def test_food101_needs_both_images_and_meta_and_reads_the_split_asked_for(food101_dir, tmp_path):
    root, split = food101_dir
    half = tmp_path / "half"
    (half / "images").mkdir(parents=True)  # images/ without meta/ is not a Food-101 folder
    with pytest.raises(ImageError) as info:
        food101(half)
    assert str(info.value) == (f"{half} is not a Food-101 folder: expected images/<class>/<id>.jpg and meta/test.json "
                               f"(or meta/test.txt) in it or in {half / 'food-101'}")
    (root / "meta" / "train.json").write_text(json.dumps({"apple_pie": split["apple_pie"][:1]}))
    assert rel_ids(food101(root, split="train"), root) == split["apple_pie"][:1]
    with pytest.raises(ImageError) as info:
        food101(root, split="val")
    assert str(info.value) == f"no meta/val.json or meta/val.txt in {root}"


def test_unknown_class_messages_name_the_close_classes_or_the_class_count(food101_dir):
    """The whole line a user reads: up to three close class keys, comma-separated, or else how many classes exist."""
    root = food101_dir[0]
    cases = {"ice creams": "--target 'ice creams': no class 'ice_creams' in Food-101's test split; did you mean "
                           "ice_cream?",
             "apple rice": "--target 'apple rice': no class 'apple_rice' in Food-101's test split; did you mean "
                           "apple_pie, fried_rice?",
             "zzz": "--target 'zzz': no class 'zzz' in Food-101's test split (3 classes in meta/test)"}
    for target, message in cases.items():
        with pytest.raises(ConfigError) as err:
            food101(root, target)
        assert str(err.value) == message
