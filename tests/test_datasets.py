"""Dataset loaders on tiny fixtures written in each real on-disk format (never downloads)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from fixtures_datasets import (
    jpeg_bytes,
    write_cifar10,
    write_cifar100,
    write_food101,
    write_image,
    write_image_folder,
    write_imagenet,
    write_tinyimagenet,
    write_vfn74,
)
from PIL import Image

from clbench.data import DATA_ROOT_ENV, ImageSet, load_rgb
from clbench.datasets import get_loader, list_datasets, load_dataset
from clbench.datasets.class_order import icarl_class_order, resolve_class_order
from clbench.datasets.imagenet import IMAGENET100_VARIANTS, imagenet_wnids
from clbench.errors import ClbenchError, ConfigError, DataNotFoundError
from clbench.registry import UnknownNameError

# PODNet's options/data/imagenet100_1order.yaml starts with these (= seed-1993 permutation).
PODNET_IMAGENET100_ORDER_HEAD = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9]


def read_wnids(variant: str) -> list[str]:
    lines = IMAGENET100_VARIANTS[variant].read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


# --------------------------------------------------------------------------- digits
def test_digits_shapes_and_fixed_stratified_split():
    train, test = load_dataset("digits", None)
    assert train.images.shape == (1437, 8, 8, 3) and test.images.shape == (360, 8, 8, 3)
    assert train.images.dtype == np.uint8 and train.images.max() == 255
    assert (train.images[..., 0] == train.images[..., 2]).all()  # grey replicated to RGB
    assert train.classes == [str(i) for i in range(10)]
    assert np.bincount(test.targets).min() >= 35  # stratified: ~36 per class
    again, _ = load_dataset("digits", "/nonexistent")  # bundled: root is irrelevant
    assert (again.images == train.images).all() and (again.targets == train.targets).all()


# --------------------------------------------------------------------------- CIFAR
def test_cifar100_reads_the_torchvision_pickles(tmp_path):
    classes = ["apple", "bear", "cloud", "dolphin"]
    written = write_cifar100(tmp_path, classes)
    train, test = load_dataset("cifar100", tmp_path)
    assert train.classes == classes and test.classes == classes
    for split, got in (("train", train), ("test", test)):
        images, labels = written[split]
        assert got.images.shape == (len(labels), 32, 32, 3) and got.images.dtype == np.uint8
        assert (got.images == images).all()  # channel order undone exactly
        assert (got.targets == labels).all() and got.paths is None
    # The root may also point at the extracted folder itself.
    again, _ = load_dataset("cifar100", tmp_path / "cifar-100-python")
    assert (again.targets == train.targets).all()


def test_cifar10_reads_five_batches(tmp_path):
    written = write_cifar10(tmp_path, ["plane", "car", "bird"])
    train, test = load_dataset("cifar10", tmp_path)
    assert len(train) == 15 and len(test) == 3
    assert (train.images == written["train"][0]).all()
    assert (test.targets == written["test"][1]).all()


def test_cifar_download_is_opt_in_and_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_cifar100(root, train, download):
        calls.append((root, train, download))
        write_cifar100(Path(root), ["a", "b"])

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_cifar100)
    with pytest.raises(DataNotFoundError):
        load_dataset("cifar100", tmp_path)
    assert calls == []  # never fetched without download=True
    train, _ = load_dataset("cifar100", tmp_path / "new", download=True)
    assert calls == [(str(tmp_path / "new"), True, True)] and train.classes == ["a", "b"]


def test_corrupt_cifar_batch_is_named(tmp_path):
    write_cifar100(tmp_path, ["a", "b"])
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(ClbenchError, match=r"cifar-100-python.test"):
        load_dataset("cifar100", tmp_path)


# --------------------------------------------------------------------------- ImageNet
def test_shipped_class_lists_are_the_published_derivations():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(set(wnids))
    digest = hashlib.md5("".join(w + "\n" for w in wnids).encode()).hexdigest()
    assert digest == "5ef135d00f8768c0f62853cd9dbc563d"  # as recorded in the file header
    assert read_wnids("podnet") == wnids[:100]  # PODNet: first 100 sorted wnids
    # LUCIR's gen_imagenet_subset.py, exactly as it runs (global legacy RNG).
    state = np.random.get_state()
    try:
        np.random.seed(1993)
        lucir = np.random.choice(wnids, 100, replace=False)
    finally:
        np.random.set_state(state)
    assert read_wnids("lucir") == sorted(lucir)
    assert len(set(read_wnids("lucir")) & set(read_wnids("podnet"))) < 100


def test_imagenet100_variants_select_their_subsets(tmp_path):
    podnet, lucir = read_wnids("podnet"), read_wnids("lucir")
    distractors = [w for w in imagenet_wnids() if w not in set(podnet) | set(lucir)][:3]
    write_imagenet(tmp_path / "imagenet", sorted(set(podnet) | set(lucir) | set(distractors)))
    for variant, wnids in (("podnet", podnet), ("lucir", lucir)):
        train, test = load_dataset("imagenet100", tmp_path, variant=variant)
        assert train.classes == wnids == sorted(wnids)
        assert len(train) == 200 and len(test) == 100 and train.images is None
        assert np.bincount(train.targets).tolist() == [2] * 100
        label = train.targets[5]
        assert Path(train.paths[5]).parent.name == wnids[label]
        assert Path(test.paths[-1]).parts[-3] == "val" and train.meta["variant"] == variant
    # A data root pointing straight at the folder holding train/ and val/ works too.
    direct, _ = load_dataset("imagenet100", tmp_path / "imagenet", variant="podnet")
    assert direct.paths == load_dataset("imagenet100", tmp_path, variant="podnet")[0].paths


def test_imagenet100_needs_a_valid_variant(tmp_path):
    with pytest.raises(ConfigError, match="needs a variant; valid variants: podnet, lucir"):
        load_dataset("imagenet100", tmp_path)
    with pytest.raises(ConfigError, match="no variant 'der'; valid variants: podnet, lucir"):
        load_dataset("imagenet100", tmp_path, variant="der")


def test_imagenet100_custom_class_list(tmp_path):
    wnids = imagenet_wnids()[500:503]
    write_imagenet(tmp_path / "imagenet", wnids)
    listing = tmp_path / "mine.txt"
    listing.write_text("# my subset\n" + "\n".join(reversed(wnids)) + "\n")
    train, _ = load_dataset("imagenet100", tmp_path, variant="custom", class_list=listing)
    assert train.classes == wnids
    with pytest.raises(ConfigError, match="class_list goes with variant 'custom'"):
        load_dataset("imagenet100", tmp_path, variant="podnet", class_list=listing)
    listing.write_text("n99999999\n")
    with pytest.raises(ConfigError, match="n99999999"):
        load_dataset("imagenet100", tmp_path, variant="custom", class_list=listing)


def test_imagenet100_names_missing_class_folders(tmp_path):
    write_imagenet(tmp_path / "imagenet", read_wnids("podnet")[:97])
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("imagenet100", tmp_path, variant="podnet")
    message = str(err.value)
    assert "lacks 6 of the 100 classes' folders" in message and "\n" not in message
    assert str((tmp_path / "imagenet").absolute()) in message


# --------------------------------------------------------------------------- food
def test_food101_follows_torchvision_layout(tmp_path):
    classes = ["waffles", "apple_pie", "ramen"]
    splits = write_food101(tmp_path, classes)
    train, test = load_dataset("food101", tmp_path)
    assert train.classes == sorted(classes)  # torchvision: sorted meta keys
    assert train.meta["class_names"] == ["Apple pie", "Ramen", "Waffles"]
    assert len(train) == 6 and len(test) == 3 and train.images is None
    for path, label in zip(test.paths, test.targets, strict=True):
        assert Path(path).is_file() and Path(path).parent.name == train.classes[label]
    rel = splits["train"]["ramen"][0]
    assert str(tmp_path / "food-101" / "images" / f"{rel}.jpg") in train.paths


def test_vfn74_layout_with_and_without_classes_txt(tmp_path):
    classes = ["rice", "bagel", "pizza"]  # classes.txt order defines the labels
    lists = write_vfn74(tmp_path, classes)
    train, test = load_dataset("vfn74", tmp_path)
    assert train.classes == classes and len(train) == 6 and len(test) == 3
    assert train.paths[0].endswith(lists["train"][0]) and train.targets[0] == 0
    (tmp_path / "vfn74" / "classes.txt").unlink()
    train, _ = load_dataset("vfn74", tmp_path)
    assert train.classes == sorted(classes)


def test_vfn74_reports_listed_files_that_are_missing(tmp_path):
    lists = write_vfn74(tmp_path, ["rice", "bagel"])
    (tmp_path / "vfn74" / lists["test"][1]).unlink()
    with pytest.raises(DataNotFoundError, match=r"1 files listed in .*test\.txt are missing"):
        load_dataset("vfn74", tmp_path)


def test_vfn74_rejects_lines_without_class(tmp_path):
    write_vfn74(tmp_path, ["rice"])
    (tmp_path / "vfn74" / "test.txt").write_text("lonely.jpg\n")
    with pytest.raises(ClbenchError, match="'lonely.jpg' is not a <class>/<image> path"):
        load_dataset("vfn74", tmp_path)


# --------------------------------------------------------------------------- Tiny-ImageNet
def test_tinyimagenet_original_layout(tmp_path):
    wnids = ["n03444034", "n01443537", "n02124075"]  # wnids.txt is not sorted
    annotations = write_tinyimagenet(tmp_path, wnids)
    train, test = load_dataset("tinyimagenet", tmp_path)
    assert train.classes == sorted(wnids) and train.images is None
    assert train.meta["class_names"][0] == "name of n01443537, alias"
    assert len(train) == 9 and np.bincount(train.targets).tolist() == [3, 3, 3]
    assert all(
        Path(p).parts[-3] == train.classes[t]
        for p, t in zip(train.paths, train.targets, strict=True)
    )
    assert [Path(p).name for p in test.paths] == [name for name, _ in annotations]
    assert [train.classes[t] for t in test.targets] == [w for _, w in annotations]
    materialized = test.materialize(num_workers=2)
    assert materialized.images.shape == (6, 64, 64, 3) and materialized.paths is None


def test_tinyimagenet_bad_annotation_is_named(tmp_path):
    write_tinyimagenet(tmp_path, ["n01443537"])
    path = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    path.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ClbenchError, match=r"val_annotations\.txt:1: .*n99999999"):
        load_dataset("tinyimagenet", tmp_path)


# --------------------------------------------------------------------------- ImageFolder trees
@pytest.mark.parametrize(
    ("name", "folder"),
    [("imagenet-r", "imagenet-r"), ("imagenet-a", "imagenet-a"), ("vtab", "vtab-cil/vtab")],
)
def test_pilot_folders_match_torchvision_imagefolder(tmp_path, name, folder):
    from torchvision.datasets import ImageFolder

    classes = ["n02084071", "n01443537", "zebra"]
    write_image_folder(tmp_path / folder, classes)
    train, test = load_dataset(name, tmp_path)
    for split, got in (("train", train), ("test", test)):
        reference = ImageFolder(str(tmp_path / folder / split))
        assert got.classes == reference.classes
        assert list(got.paths) == [p for p, _ in reference.samples]
        assert got.targets.tolist() == [t for _, t in reference.samples]


def test_vtab_also_found_as_plain_vtab_folder(tmp_path):
    write_image_folder(tmp_path / "vtab", ["a", "b"])
    train, _ = load_dataset("vtab", tmp_path)
    assert train.classes == ["a", "b"] and len(train) == 6  # 2 + nested file per class


def test_folder_test_split_must_have_the_train_classes(tmp_path):
    write_image_folder(tmp_path / "imagenet-r", ["a", "b", "c"])
    for image in (tmp_path / "imagenet-r" / "test" / "b").iterdir():
        image.unlink()
    (tmp_path / "imagenet-r" / "test" / "b").rmdir()
    with pytest.raises(
        ClbenchError, match=r"differ from the train split's: missing 1 \(e\.g\. b\)"
    ):
        load_dataset("imagenet-r", tmp_path)


def test_generic_folder_with_path_and_split_names(tmp_path):
    write_image_folder(tmp_path / "mydata", ["cat", "dog"], test="val")
    (tmp_path / "mydata" / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    train, test = load_dataset("folder", tmp_path, path="mydata", test="val")
    assert train.classes == ["cat", "dog"] and len(test) == 2
    with pytest.raises(DataNotFoundError, match=r"mydata.\{train,test\}"):
        load_dataset("folder", tmp_path, path="mydata")


# --------------------------------------------------------------------------- errors
EXPECTED_WHERE = {
    "cifar100": ("cifar-100-python", "download=True"),
    "cifar10": ("cifar-10-batches-py", "download=True"),
    "imagenet100": ("imagenet", "image-net.org"),
    "imagenet1k": ("imagenet", "image-net.org"),
    "food101": ("food-101", "download=True"),
    "vfn74": ("vfn74", "lorenz.ecn.purdue.edu/~vfn"),
    "tinyimagenet": ("tiny-imagenet-200", "download=True"),
    "imagenet-r": ("imagenet-r", "LAMDA-PILOT"),
    "imagenet-a": ("imagenet-a", "LAMDA-PILOT"),
    "vtab": ("vtab-cil/vtab", "LAMDA-PILOT"),
    "folder": ("{train,test}", "path option"),
    "video": ("video/bigbuckbunny.mp4", "docs/video.md"),
}


def test_every_dataset_has_a_missing_data_message():
    assert set(EXPECTED_WHERE) | {"digits"} == set(list_datasets())


@pytest.mark.parametrize("name", sorted(EXPECTED_WHERE))
def test_missing_data_is_one_line_naming_path_and_remedy(tmp_path, name):
    variant = "podnet" if name == "imagenet100" else None
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(name, tmp_path / "data", variant=variant)
    message = str(err.value)
    folder, remedy = EXPECTED_WHERE[name]
    assert "\n" not in message and remedy in message
    assert str((tmp_path / "data").absolute() / folder) in message
    assert "--data-root" in message and DATA_ROOT_ENV in message


def test_data_root_comes_from_the_environment(tmp_path, monkeypatch):
    write_cifar100(tmp_path, ["a", "b"])
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    train, _ = load_dataset("cifar100")
    assert train.classes == ["a", "b"]


def test_unknown_dataset_option_and_variant_are_one_line():
    with pytest.raises(UnknownNameError, match=r"did you mean 'vfn74'.*valid dataset names: c"):
        load_dataset("vfn-74", None)
    with pytest.raises(ConfigError, match="no option 'seed'; valid options: test_size, split_seed"):
        load_dataset("digits", None, seed=3)
    with pytest.raises(ConfigError, match="has no variants"):
        load_dataset("digits", None, variant="x")
    assert get_loader("imagenetr").name == "imagenet-r"  # PILOT's name is an alias


def test_corrupt_image_error_names_the_file(tmp_path):
    good = write_image(tmp_path / "ok.jpg")
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(jpeg_bytes()[:40])  # truncated
    with pytest.raises(ClbenchError, match="broken.JPEG"):
        load_rgb(bad)
    images = ImageSet(targets=[0, 0, 1], classes=["a", "b"], paths=[str(good)] * 2 + [str(bad)])
    with pytest.raises(ClbenchError, match="broken.JPEG"):
        images.image(2)
    with pytest.raises(ClbenchError, match="broken.JPEG"):
        images.materialize(num_workers=2)
    with pytest.raises(DataNotFoundError, match="gone.jpg"):
        load_rgb(tmp_path / "gone.jpg")


# --------------------------------------------------------------------------- materialize
def test_materialize_decodes_resizes_and_refuses_mixed_sizes(tmp_path):
    paths = []
    for i, (h, w) in enumerate([(8, 8), (8, 8), (12, 6)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(paths[-1])
    lazy = ImageSet(targets=[0, 1, 1], classes=["a", "b"], paths=paths, name="mixed")
    with pytest.raises(ClbenchError, match=r"2\.png is 6x12 .* pass size="):
        lazy.materialize()
    one = lazy.materialize(num_workers=1, size=(4, 5))
    two = lazy.materialize(num_workers=2, size=(4, 5))
    assert one.images.shape == (3, 4, 5, 3) and (one.images == two.images).all()
    assert one.images[2].max() == 80 and (one.targets == lazy.targets).all()
    assert one.materialize() is one  # already in memory
    assert one.materialize(size=2).images.shape == (3, 2, 2, 3)
    same = lazy.subset(np.array([0, 1])).materialize()
    assert same.images.shape == (2, 8, 8, 3) and same.images[1].max() == 40


# --------------------------------------------------------------------------- class orders
def test_icarl_order_is_pycil_seed_1993_permutation():
    order = icarl_class_order(100)
    assert order[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert order[: len(PODNET_IMAGENET100_ORDER_HEAD)] == PODNET_IMAGENET100_ORDER_HEAD
    state = np.random.get_state()
    try:  # PyCIL's DataManager, verbatim in effect
        np.random.seed(1993)
        pycil = np.random.permutation(len(range(100))).tolist()
        np.random.seed(7)
        before = np.random.random()
        np.random.seed(7)
        icarl_class_order(100)
        assert np.random.random() == before  # the global RNG is left alone
    finally:
        np.random.set_state(state)
    assert order == pycil and sorted(order) == list(range(100))


def test_resolve_class_order_names_lists_and_errors():
    classes = ["n1", "n2", "n3"]
    assert resolve_class_order("icarl", 100) == icarl_class_order(100)
    assert resolve_class_order("identity", classes) == [0, 1, 2]
    assert resolve_class_order("sorted", 3) == [0, 1, 2]
    assert resolve_class_order([2, 0, 1], classes) == [2, 0, 1]
    assert resolve_class_order(["n3", "n1", "n2"], classes) == [2, 0, 1]
    with pytest.raises(ConfigError, match=r"permutation of 0..2 .* missing \[2\], repeated \[0\]"):
        resolve_class_order([0, 0, 1], classes)
    with pytest.raises(ConfigError, match="unknown classes"):
        resolve_class_order(["n9", "n1", "n2"], classes)
    with pytest.raises(UnknownNameError, match="valid class order names: icarl, identity"):
        resolve_class_order("random", classes)


def test_food101_meta_json_is_what_torchvision_reads(tmp_path):
    from torchvision.datasets import Food101

    write_food101(tmp_path, ["b_class", "a_class"])
    reference = Food101(str(tmp_path), split="test")
    train, test = load_dataset("food101", tmp_path)
    assert test.classes == reference.classes
    assert list(test.paths) == [str(p) for p in reference._image_files]
    assert test.targets.tolist() == reference._labels
    assert json.loads((tmp_path / "food-101" / "meta" / "test.json").read_text())


# --------------------------------------------------------------------------- bad data, one line
def test_data_root_that_is_a_file_says_so(tmp_path, monkeypatch):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataNotFoundError, match=r"data root .*data\.zip is a file, not a folder"):
        load_dataset("cifar100", f)
    monkeypatch.setenv(DATA_ROOT_ENV, str(f))
    with pytest.raises(DataNotFoundError, match=f"is a file.*point \\${DATA_ROOT_ENV} at"):
        load_dataset("cifar100")


def test_every_unreadable_file_is_named_in_one_message(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "mydata", ["cat", "dog"], per_class=(4, 1))
    train = tmp_path / "mydata" / "train"
    (train / "cat" / "cat_1.JPEG").write_bytes(b"")  # zero bytes
    (train / "dog" / "dog_2.png").write_bytes(b"")
    with pytest.raises(ClbenchError) as err:  # at load time: a stat per file, no decoding
        load_dataset("folder", tmp_path, path="mydata")
    msg = str(err.value)
    assert "\n" not in msg and "2 of 10 image files cannot be read" in msg
    assert "cat_1.JPEG (empty file (0 bytes))" in msg and "dog_2.png (empty file" in msg

    # decoding: undecodable and empty files are collected, the first MAX_LISTED named
    monkeypatch.setattr("clbench.data.MAX_LISTED", 2)
    good = write_image(tmp_path / "ok.jpg")
    bad = [tmp_path / f"bad{i}.jpg" for i in range(3)]
    bad[0].write_bytes(jpeg_bytes()[:40])  # truncated
    bad[1].write_bytes(b"")
    bad[2].write_bytes(b"not an image")
    paths = [str(p) for p in (bad[0], good, bad[1], good, bad[2])]
    lazy = ImageSet(targets=[0, 1, 0, 1, 0], classes=["a", "b"], paths=paths, name="mine")
    for workers in (1, 2):
        with pytest.raises(ClbenchError) as err:
            lazy.materialize(num_workers=workers)
        msg = str(err.value)
        assert msg.startswith("mine: 3 of 5 image files cannot be read: ") and "\n" not in msg
        assert "bad0.jpg (" in msg and "bad1.jpg (empty file (0 bytes))" in msg
        assert msg.endswith("; and 1 more; delete or replace them")


def test_a_large_set_that_passed_the_file_check_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr("clbench.data.VERIFY_CACHE_MIN", 2)
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    paths = [str(write_image(tmp_path / f"{i}.png")) for i in range(3)]
    lazy = ImageSet(targets=[0, 1, 0], classes=["a", "b"], paths=paths, name="big")
    lazy.check_files()
    assert len(list((tmp_path / "cache" / "verified-files").iterdir())) == 1
    # same paths, sizes and mtimes: only stat, so damage inside a header goes unseen...
    st = os.stat(paths[1])
    with open(paths[1], "r+b") as f:
        f.write(b"garbage!")
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    lazy.check_files()
    # ...but a changed size or mtime, or an empty file, is checked again
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ClbenchError, match=r"big: 1 of 3 image files cannot be read: .*1\.png"):
        lazy.check_files()
    Path(paths[1]).write_bytes(b"")
    with pytest.raises(ClbenchError, match="empty file"):
        lazy.check_files()


def test_decoded_images_are_writable_so_torch_does_not_warn(tmp_path):
    from clbench.scenarios import ImageSetDataset

    path = write_image(tmp_path / "a.jpg")
    assert load_rgb(path).flags.writeable
    lazy = ImageSet(targets=[0], classes=["a"], paths=[str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "NumPy array is not writable" UserWarning
        x, _ = ImageSetDataset(lazy, np.arange(1))[0]
    assert x.shape == (3, 8, 8)


def test_class_range_is_applied_by_the_dataset_layer(tmp_path):
    write_cifar100(tmp_path, ["a", "b", "c", "d"])
    train, test = load_dataset("cifar100", tmp_path, class_range=[1, 3])
    assert train.classes == ["b", "c"] and sorted(set(train.targets)) == [0, 1]
    assert sorted(set(test.targets)) == [0, 1]
    with pytest.raises(ConfigError, match=r"class_range \[2, 9\] does not fit the 4 classes"):
        load_dataset("cifar100", tmp_path, class_range=[2, 9])


def test_benchmark_class_orders_go_through_the_registry():
    from clbench.config import load_config
    from clbench.scenarios import build_scenario

    base = ["dataset.class_range=[0, 4]", "scenario.split=B0Inc2", "scenario.num_experiences=2"]
    sc = build_scenario(load_config("digits", [*base, "scenario.class_order=identity"]))
    assert sc.class_order == [0, 1, 2, 3] and sc.class_names == ["0", "1", "2", "3"]
    named = build_scenario(load_config("digits", [*base, "scenario.class_order=['3','1','0','2']"]))
    assert named.class_order == [3, 1, 0, 2]
    with pytest.raises(ConfigError, match="class_order 'random': valid values: icarl, identity"):
        load_config("digits", ["scenario.class_order=random"])
    with pytest.raises(ConfigError, match=r"scenario.class_order: .*missing \[3\]"):
        build_scenario(load_config("digits", [*base, "scenario.class_order=[0, 1, 2]"]))
