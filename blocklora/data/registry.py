"""The datasets the benchmark knows: where they come from, how they are laid out, how they are split.

Every fact here (URLs, checksums, Google Drive ids, counts) is documented in docs/protocol.md: §3
(datasets), §5 (prompt templates) and §7 (the transfer sets). Where the authors publish no checksum,
the sha256 comes from TensorFlow Datasets' URL checksum records, or (UCF101's frames, Food101's and
SUN397's split files) is recorded on first download in checksums.json (see blocklora.data.fetch). A prepared dataset lives in
``<data_root>/<name>/``: the archives are extracted there, the images sit under
``<data_root>/<name>/<image_dir>/`` and ``split.json`` (CoOp format) is written last.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

SourceKind = Literal["archive", "file", "split"]
SplitSource = Literal["split_zhou", "fgvc_official", "imagenet_folders", "eval_only"]

# Values of DatasetSpec.split_source. "split_zhou": a CoOp split file fetched from Google Drive.
# "fgvc_official": the official images_variant_{train,val,test}.txt. "imagenet_folders": train/val
# class folders (val doubles as test, as in CoOp). "eval_only": a test set only, built from folders.
SPLIT_SOURCES: tuple[str, ...] = ("split_zhou", "fgvc_official", "imagenet_folders", "eval_only")


@dataclass(frozen=True)
class Source:
    """One file a dataset needs: an archive to extract, a plain file, or a split file."""

    filename: str
    url: str | None = None
    gdrive_id: str | None = None
    md5: str | None = None
    sha256: str | None = None
    kind: SourceKind = "archive"
    # Other names (and md5s) under which a user may have placed an equivalent file by hand.
    alternatives: tuple[tuple[str, str | None], ...] = ()
    # Bytes of the published file, for the plan's disk estimate: as TensorFlow Datasets' URL checksum
    # records give them (ILSVRC's devkit: about 2.5 MB); None where no source states it.
    size: int | None = None

    @property
    def remote(self) -> str | None:
        """The URL this file is fetched from (Google Drive shown as a uc?id= link), or None."""
        if self.url:
            return self.url
        if self.gdrive_id:
            return f"https://drive.google.com/uc?id={self.gdrive_id}"
        return None


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the pipeline needs to know about one dataset."""

    name: str
    title: str
    template: str
    image_dir: str
    num_classes: int
    sources: tuple[Source, ...] = ()
    # Paths (relative to <data_root>/<name>/) that must exist once the archives are extracted.
    layout: tuple[str, ...] = ()
    # Expected number of entries per split (train/val/test); None where the protocol did not check them.
    split_sizes: dict[str, int] | None = None
    # False where the sizes are derived, not checked: a mismatch then warns instead of failing.
    split_sizes_verified: bool = True
    # Fewest image files expected under image_dir after extraction (None: not checked).
    min_images: int | None = None
    # Class folders of the test images (ImageNet's val, the test-only variants); None: num_classes.
    test_folders: int | None = None
    split_source: SplitSource = "split_zhou"
    # Archives found after extraction that must themselves be extracted (relative to the dataset root).
    nested_archives: tuple[str, ...] = ()
    # Name of the entry in CLASSNAME_CLEANUP applied to raw folder names when we build a split.
    classname_cleanup: str | None = None
    # eval_only: how class folders are named: "index" (0..999) or "wnid" (nXXXXXXXX).
    label_folders: Literal["index", "wnid"] | None = None
    # True when labels are ImageNet class indices (0..999) even if only a subset of classes is present.
    imagenet_labels: bool = False
    manual: str = ""
    notes: str = ""
    synthetic: bool = False
    # How the archives become the layout: "extract" each into the dataset folder, or "ilsvrc2012"
    # (the ImageNet train tar of per-class tars, the flat val tar sorted into classes by the devkit).
    unpack: Literal["extract", "ilsvrc2012"] = "extract"

    def __hash__(self) -> int:
        return hash(self.name)

    def split_file_source(self) -> Source | None:
        """The Source of kind "split" (the split_zhou file), if any."""
        return next((s for s in self.sources if s.kind == "split"), None)


# ---------------------------------------------------------------------------------------------
# Class-name cleanup (docs/protocol.md §3), applied to raw folder names when we generate a split.

CALTECH101_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH101_RENAMES = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}
EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


def _caltech101(raw: str) -> str:
    return CALTECH101_RENAMES.get(raw, raw)


def _eurosat(raw: str) -> str:
    return EUROSAT_RENAMES.get(raw, raw)


def _sun397(raw: str) -> str:
    """``/a/abbey`` -> ``abbey``; ``/a/apartment_building/outdoor`` -> ``outdoor apartment_building``."""
    parts = [p for p in raw.strip("/").split("/") if p]
    return " ".join(reversed(parts[1:]))


def _ucf101(raw: str) -> str:
    """``ApplyEyeMakeup`` -> ``Apply_Eye_Makeup`` (CoOp's CamelCase split)."""
    return "_".join(re.findall("[A-Z][^A-Z]*", raw)) or raw


CLASSNAME_CLEANUP: dict[str, Callable[[str], str]] = {
    "caltech101": _caltech101,
    "eurosat": _eurosat,
    "sun397": _sun397,
    "ucf101": _ucf101,
}


def clean_classname(spec: DatasetSpec, raw: str) -> str:
    """Apply the dataset's class-name cleanup to a raw folder name (identity when it has none)."""
    if spec.classname_cleanup is None:
        return raw
    return CLASSNAME_CLEANUP[spec.classname_cleanup](raw)


def prompt_classname(classname: str) -> str:
    """The class name as it goes into a prompt: underscores become spaces."""
    return classname.replace("_", " ")


# ---------------------------------------------------------------------------------------------
# The specs.

_GENERIC = "a photo of a {}."
_OX = "https://www.robots.ox.ac.uk/~vgg/data"

_IMAGENET_MANUAL = (
    "ImageNet (ILSVRC-2012) cannot be downloaded automatically: its licence requires an account at "
    "https://image-net.org. Download ILSVRC2012_img_train.tar (md5 1d675b47d978889d74fa0da5fadfb00e), "
    "ILSVRC2012_img_val.tar (md5 29b22e2961454d5413ddabcf34fc5622) and ILSVRC2012_devkit_t12.tar.gz "
    "(md5 fa75699e90414af021442c21a62c3abf) into the archives folder (config `archives_dir`) or into "
    "<data_root>/imagenet/; prepare unpacks them into one folder per class. Or place class folders you "
    "already have as <data_root>/imagenet/images/train/nXXXXXXXX/*.JPEG and "
    "<data_root>/imagenet/images/val/nXXXXXXXX/*.JPEG (1000 each). Then rerun."
)

_CARS_MANUAL = (
    "StanfordCars has no live official URL (ai.stanford.edu links are dead, pytorch/vision#7545). Get "
    "cars_train.tgz (md5 065e5b463ae28d29e77c1b4b166cfe61) and cars_test.tgz (md5 "
    "4ce7ebf6a94d07f1952d94dd34c4d501) from a copy you trust and put them in the archives folder (or in "
    "<data_root>/stanford_cars/); or place the extracted folders as <data_root>/stanford_cars/cars_train/"
    "*.jpg and <data_root>/stanford_cars/cars_test/*.jpg. Known mirrors: Kaggle "
    "jessicali9530/stanford-cars-dataset (its zip nests cars_train/cars_train/: move the inner folders "
    "up one level), devkit re-upload https://github.com/pytorch/vision/files/11644847/car_devkit.tgz "
    "(md5 c3b158d763b6e2245038c8ad08e45376; not needed for the CoOp split). Then rerun."
)

_SUN_MANUAL = (
    "SUN397's official archive http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz (md5 "
    "8ca2778205c41d23104230ba66911c7a) and the MIT mirror are gone (404); there is no verified mirror. "
    "If you hold a copy, put SUN397.tar.gz in the archives folder (or in <data_root>/sun397/), or place "
    "the extracted tree as <data_root>/sun397/SUN397/a/abbey/*.jpg, ... Then rerun."
)


# sha256 of CoOp's published split files (the copies in tests/data/splits/ are these files, byte for
# byte). Food101's and SUN397's are not known here: theirs is recorded on first download (checksums.json).
_SPLIT_SHA256 = {
    "Caltech101": "52ce83205ff8ff8a1a18119aad6376120ae35c36e783a984bc560cbf10e73fa5",
    "DescribableTextures": "f26ebeccd2b58e68d70f07a0dc39fe49bf7b69024bac34396b954dfd87969c38",
    "EuroSAT": "541503a77d0b26b735d85ec7a3e672804fe0aa466c2e5f07da772cc6c0af8ad2",
    "OxfordFlowers": "2f50c42fc1a17ca13c271cb4269b1347bdb43d2be672e34f74a4e4cbfbcca794",
    "OxfordPets": "d7f3ffe65b3919f95132e51422894ae18686b83c331fd8c0adcdc3dc2de6301e",
    "StanfordCars": "40acee7aa65c8e4727a32d90e884b7c3f8960b523422317e163f7af65432959d",
    "UCF101": "d78cb834f7c5792ceaff2c5ee2d7c76a9e4086e48a3a6b01232989d29cbefdd8",
}


def _split(gdrive_id: str, coop_name: str) -> Source:
    return Source(
        filename=f"split_zhou_{coop_name}.json",
        gdrive_id=gdrive_id,
        sha256=_SPLIT_SHA256.get(coop_name),
        kind="split",
    )


_BUILTIN: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="imagenet",
        title="ImageNet",
        template=_GENERIC,
        image_dir="images",
        num_classes=1000,
        sources=(
            Source(
                filename="ILSVRC2012_img_train.tar", md5="1d675b47d978889d74fa0da5fadfb00e", size=147897477120
            ),
            Source(
                filename="ILSVRC2012_img_val.tar", md5="29b22e2961454d5413ddabcf34fc5622", size=6744924160
            ),
            Source(
                filename="ILSVRC2012_devkit_t12.tar.gz", md5="fa75699e90414af021442c21a62c3abf", size=2500000
            ),
        ),
        unpack="ilsvrc2012",
        layout=("images/train", "images/val"),
        split_sizes={"train": 1_281_167, "val": 0, "test": 50_000},
        split_source="imagenet_folders",
        manual=_IMAGENET_MANUAL,
        notes="No split file: train = ILSVRC-12 train folders, test = ILSVRC-12 val; no val of its own "
        "(CoOp reuses the test images as val): the few-shot val is drawn from the train images. "
        "Class names are CLIP's, ordered by sorted wnid (package file imagenet_classnames.txt).",
    ),
    DatasetSpec(
        name="caltech101",
        title="Caltech101",
        template=_GENERIC,
        image_dir="101_ObjectCategories",
        num_classes=100,
        sources=(
            Source(
                filename="caltech-101.zip",
                url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                md5="3138e1922a9193bfa496528edbbc45d0",
                size=137_414_764,
                alternatives=(("101_ObjectCategories.tar.gz", "b224c7392d521a49829488ab0f1120d9"),),
            ),
            _split("1hyarUivQE36mY6jSomru6Fjd-JzwcCzN", "Caltech101"),
        ),
        layout=("101_ObjectCategories/accordion",),
        split_sizes={"train": 4128, "val": 1649, "test": 2465},
        min_images=4128 + 1649 + 2465,
        nested_archives=("caltech-101/101_ObjectCategories.tar.gz",),
        classname_cleanup="caltech101",
        manual="Get caltech-101.zip from https://data.caltech.edu/records/20086 (it holds "
        "101_ObjectCategories.tar.gz, md5 b224c7392d521a49829488ab0f1120d9; either file will do) and put it "
        "in the archives folder or in <data_root>/caltech101/.",
    ),
    DatasetSpec(
        name="oxford_pets",
        title="OxfordPets",
        template="a photo of a {}, a type of pet.",
        image_dir="images",
        num_classes=37,
        sources=(
            Source(
                filename="images.tar.gz",
                url=f"{_OX}/pets/data/images.tar.gz",
                md5="5c4f3ee8e5d25df40f4fd59a7f44e54c",
                size=791_918_971,
            ),
            _split("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs", "OxfordPets"),
        ),
        layout=("images",),
        split_sizes={"train": 2944, "val": 736, "test": 3669},
        min_images=2944 + 736 + 3669,
        manual=f"Get images.tar.gz from {_OX}/pets/ and put it in the archives folder or in "
        "<data_root>/oxford_pets/. (annotations.tar.gz is not needed: the CoOp split names the labels.)",
    ),
    DatasetSpec(
        name="stanford_cars",
        title="StanfordCars",
        template=_GENERIC,
        image_dir=".",
        num_classes=196,
        sources=(
            Source(filename="cars_train.tgz", md5="065e5b463ae28d29e77c1b4b166cfe61", size=979269282),
            Source(filename="cars_test.tgz", md5="4ce7ebf6a94d07f1952d94dd34c4d501", size=977350468),
            _split("1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT", "StanfordCars"),
        ),
        layout=("cars_train", "cars_test"),
        split_sizes={"train": 6509, "val": 1635, "test": 8041},
        min_images=6509 + 1635 + 8041,
        manual=_CARS_MANUAL,
    ),
    DatasetSpec(
        name="oxford_flowers",
        title="Flowers102",
        template="a photo of a {}, a type of flower.",
        image_dir="jpg",
        num_classes=102,
        sources=(
            Source(
                filename="102flowers.tgz",
                url=f"{_OX}/flowers/102/102flowers.tgz",
                md5="52808999861908f626f3c1f4e79d11fa",
                size=344_862_509,
            ),
            _split("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT", "OxfordFlowers"),
        ),
        layout=("jpg",),
        split_sizes={"train": 4093, "val": 1633, "test": 2463},
        min_images=4093 + 1633 + 2463,
        manual=f"Get 102flowers.tgz from {_OX}/flowers/102/ and put it in the archives folder or in "
        "<data_root>/oxford_flowers/. (imagelabels.mat and cat_to_name.json are not needed: the CoOp split "
        "names the labels.)",
    ),
    DatasetSpec(
        name="food101",
        title="Food101",
        template="a photo of {}, a type of food.",
        image_dir="food-101/images",
        num_classes=101,
        sources=(
            Source(
                filename="food-101.tar.gz",
                url="http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                md5="85eeb15f3717b99a5da872d97d918f87",
                size=4_996_278_331,
            ),
            _split("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl", "Food101"),
        ),
        layout=("food-101/images",),
        split_sizes={"train": 50_500, "val": 20_200, "test": 30_300},
        split_sizes_verified=False,
        min_images=101_000,
        manual="Get food-101.tar.gz (5 GB) from http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz and put "
        "it in the archives folder or in <data_root>/food101/.",
        notes="Split sizes are derived (docs/protocol.md §3), not checked against the split file.",
    ),
    DatasetSpec(
        name="fgvc_aircraft",
        title="FGVCAircraft",
        template="a photo of a {}, a type of aircraft.",
        image_dir="fgvc-aircraft-2013b/data/images",
        num_classes=100,
        sources=(
            Source(
                filename="fgvc-aircraft-2013b.tar.gz",
                url=f"{_OX}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                sha256="d5f68b1b81d6d7831eb9d5c5517074176b5dfbce6bcb43dc14ed1c66a87b8d75",
                size=2_770_575_360,
            ),
        ),
        layout=(
            "fgvc-aircraft-2013b/data/images",
            "fgvc-aircraft-2013b/data/variants.txt",
            "fgvc-aircraft-2013b/data/images_variant_train.txt",
            "fgvc-aircraft-2013b/data/images_variant_val.txt",
            "fgvc-aircraft-2013b/data/images_variant_test.txt",
        ),
        split_sizes={"train": 3334, "val": 3333, "test": 3333},
        split_sizes_verified=False,
        min_images=10_000,
        split_source="fgvc_official",
        manual=f"Get fgvc-aircraft-2013b.tar.gz from {_OX}/fgvc-aircraft/ and put it in the archives folder "
        "or in <data_root>/fgvc_aircraft/.",
        notes="The authors publish no checksum; the sha256 is TensorFlow Datasets' record of this URL. "
        "Split sizes (3334/3333/3333) are the official ones; docs/protocol.md §3 did not check them.",
    ),
    DatasetSpec(
        name="sun397",
        title="SUN397",
        template=_GENERIC,
        image_dir="SUN397",
        num_classes=397,
        sources=(
            Source(filename="SUN397.tar.gz", md5="8ca2778205c41d23104230ba66911c7a", size=39077296924),
            _split("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq", "SUN397"),
        ),
        layout=("SUN397/a/abbey",),
        split_sizes={"train": 15_880, "val": 3_970, "test": 19_850},
        split_sizes_verified=False,
        min_images=15_880 + 3_970 + 19_850,
        classname_cleanup="sun397",
        manual=_SUN_MANUAL,
        notes="Split sizes are derived (docs/protocol.md §3), not checked against the split file.",
    ),
    DatasetSpec(
        name="dtd",
        title="DTD",
        template="{} texture.",
        image_dir="dtd/images",
        num_classes=47,
        sources=(
            Source(
                filename="dtd-r1.0.1.tar.gz",
                url=f"{_OX}/dtd/download/dtd-r1.0.1.tar.gz",
                md5="fff73e5086ae6bdbea199a49dfb8a4c1",
                size=625_239_812,
            ),
            _split("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x", "DescribableTextures"),
        ),
        layout=("dtd/images/banded",),
        split_sizes={"train": 2820, "val": 1128, "test": 1692},
        min_images=2820 + 1128 + 1692,
        manual=f"Get dtd-r1.0.1.tar.gz from {_OX}/dtd/ and put it in the archives folder or in <data_root>/dtd/.",
    ),
    DatasetSpec(
        name="eurosat",
        title="EuroSAT",
        template="a centered satellite photo of {}.",
        image_dir="2750",
        num_classes=10,
        sources=(
            Source(
                filename="EuroSAT.zip",
                url="https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
                md5="c8fa014336c82ac7804f0398fcb19387",
                size=94_280_567,
            ),
            _split("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o", "EuroSAT"),
        ),
        layout=("2750/AnnualCrop",),
        split_sizes={"train": 13_500, "val": 5_400, "test": 8_100},
        min_images=13_500 + 5_400 + 8_100,
        classname_cleanup="eurosat",
        manual="Get EuroSAT.zip (RGB) from https://huggingface.co/datasets/torchgeo/eurosat and put it in the "
        "archives folder or in <data_root>/eurosat/ (the old madm.dfki.de host has an expired certificate).",
    ),
    DatasetSpec(
        name="ucf101",
        title="UCF101",
        template="a photo of a person doing {}.",
        image_dir="UCF-101-midframes",
        num_classes=101,
        sources=(
            Source(filename="UCF-101-midframes.zip", gdrive_id="10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),
            _split("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y", "UCF101"),
        ),
        layout=("UCF-101-midframes/Apply_Eye_Makeup",),
        split_sizes={"train": 7639, "val": 1898, "test": 3783},
        min_images=7639 + 1898 + 3783,
        classname_cleanup="ucf101",
        manual="Get UCF-101-midframes.zip (CoOp's middle frames) from Google Drive "
        "https://drive.google.com/uc?id=10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O and put it in the archives folder "
        "or in <data_root>/ucf101/.",
    ),
    DatasetSpec(
        name="imagenet_v2",
        title="ImageNet-V2",
        template=_GENERIC,
        image_dir="imagenetv2-matched-frequency-format-val",
        num_classes=1000,
        sources=(
            Source(
                filename="imagenetv2-matched-frequency.tar.gz",
                url="https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                "imagenetv2-matched-frequency.tar.gz",
                sha256="f0c37fdf925916b19ea1323cd9a2208cdb6959ba2c32eef2a7fc393835c9ca7c",
                size=1_264_079_360,
            ),
        ),
        layout=("imagenetv2-matched-frequency-format-val/0", "imagenetv2-matched-frequency-format-val/999"),
        split_sizes={"train": 0, "val": 0, "test": 10_000},
        min_images=10_000,
        split_source="eval_only",
        label_folders="index",
        imagenet_labels=True,
        manual="Get imagenetv2-matched-frequency.tar.gz from https://huggingface.co/datasets/vaishaal/ImageNetV2 "
        "and put it in the archives folder or in <data_root>/imagenet_v2/.",
        notes="Evaluation only. Folders 0..999 are ImageNet class indices. The authors publish no checksum; "
        "the sha256 and size are TensorFlow Datasets' record of this URL (the file on Hugging Face differs "
        "from the older S3 copy). The URL names the branch `main`, not a commit: the sha256 pins the bytes.",
    ),
    DatasetSpec(
        name="imagenet_sketch",
        title="ImageNet-Sketch",
        template=_GENERIC,
        image_dir="sketch",
        num_classes=1000,
        sources=(
            Source(
                filename="ImageNet-Sketch.zip",
                gdrive_id="1Mj0i5HBthqH1p_yeXzsg22gZduvgoNeA",
                sha256="4d3ce6b82a7c48aabf14aeac105eb533e75707f152cc858f55bfc022031a72ed",
                size=7_593_573_012,
            ),
        ),
        layout=("sketch/n01440764",),
        split_sizes={"train": 0, "val": 0, "test": 50_889},
        min_images=50_889,
        split_source="eval_only",
        label_folders="wnid",
        imagenet_labels=True,
        manual="Get ImageNet-Sketch.zip from Google Drive https://drive.google.com/uc?id="
        "1Mj0i5HBthqH1p_yeXzsg22gZduvgoNeA (github.com/HaohanWang/ImageNet-Sketch) and put it in the archives "
        "folder or in <data_root>/imagenet_sketch/.",
        notes="Evaluation only; wnid folders mapped to ImageNet indices. The authors publish no checksum; the "
        "sha256 is TensorFlow Datasets' record of this file.",
    ),
    DatasetSpec(
        name="imagenet_a",
        title="ImageNet-A",
        template=_GENERIC,
        image_dir="imagenet-a",
        num_classes=200,
        sources=(
            Source(
                filename="imagenet-a.tar",
                url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                sha256="3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e",
                size=687_552_512,
            ),
        ),
        layout=("imagenet-a",),
        split_sizes={"train": 0, "val": 0, "test": 7_500},
        min_images=7_500,
        split_source="eval_only",
        label_folders="wnid",
        imagenet_labels=True,
        manual="Get imagenet-a.tar from https://github.com/hendrycks/natural-adv-examples and put it in the "
        "archives folder or in <data_root>/imagenet_a/.",
        notes="Evaluation only, 200 of the 1000 ImageNet classes (the wnid folders present). Labels are "
        "ImageNet indices; restrict logits to the labels present in the split (see splits.class_subset). "
        "The sha256 is TensorFlow Datasets' record of this URL (the authors publish none).",
    ),
    DatasetSpec(
        name="imagenet_r",
        title="ImageNet-R",
        template=_GENERIC,
        image_dir="imagenet-r",
        num_classes=200,
        sources=(
            Source(
                filename="imagenet-r.tar",
                url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                md5="a61312130a589d0ca1a8fca1f2bd3337",
                sha256="18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52",
                size=2_191_079_936,
            ),
        ),
        layout=("imagenet-r",),
        split_sizes={"train": 0, "val": 0, "test": 30_000},
        min_images=30_000,
        split_source="eval_only",
        label_folders="wnid",
        imagenet_labels=True,
        manual="Get imagenet-r.tar from https://github.com/hendrycks/imagenet-r and put it in the archives "
        "folder or in <data_root>/imagenet_r/.",
        notes="Evaluation only, 200 ImageNet classes (the wnid folders present); labels are ImageNet indices. "
        "The md5 is quoted by one loader; the sha256 is TensorFlow Datasets' record of this URL.",
    ),
)

_REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _BUILTIN}
_PLUGINS = ("blocklora.data.synthetic",)
_plugins_loaded = False


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a spec (e.g. a synthetic demo dataset); registering the same spec twice is a no-op."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"dataset {spec.name!r} is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    return spec


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def dataset_names(*, include_synthetic: bool = True) -> list[str]:
    """Names of the registered datasets, built-in ones first, in registration order."""
    _load_plugins()
    return [name for name, spec in _REGISTRY.items() if include_synthetic or not spec.synthetic]


def builtin_names() -> list[str]:
    """The real datasets' names (no plugin loaded)."""
    return [spec.name for spec in _BUILTIN]


def builtin_spec(name: str) -> DatasetSpec | None:
    """The spec of a built-in dataset, or None; loads no plugin (the workflow asks this while planning)."""
    return next((spec for spec in _BUILTIN if spec.name == name), None)


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered under ``name``; ValueError naming it and the known names otherwise."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(dataset_names())
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}") from None
