"""Labelled image folders (ImageFolder layout) for training and evaluation.

  DATA/<class>/**/<image>    one subfolder per class, images found recursively inside it;
                             classes in natural order ("class2" < "class10"); hidden files
                             and folders (".masks", ".DS_Store") are skipped.
  DATA/<a>+<b>/**/<image>    (training only) images that hold classes a and b at once, when
                             a and b are class folders too: their target gives each class an
                             equal share (1/2 for two). A "+" folder whose parts are not all
                             classes is a class of its own, as before.

The dataset, batches and loaders over a scanned folder are in data/labelled.py.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from ..fileio import is_output_folder
from .images import IMAGE_EXTENSIONS, is_image_path
from .inputs import natural_key

_EXTENSIONS = ", ".join(sorted(IMAGE_EXTENSIONS))


GROUP_SEPARATOR = "+"  # "circle+square": images holding both classes


@dataclass
class LabelledImages:
    """Images with labels: a class index into `classes`, or len(classes) + g for an image of
    every class in `groups[g]` at once (multi-class folders, training only)."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)  # (path, label)
    skipped: list[str] = field(default_factory=list)  # files left out, one message each
    groups: list[tuple[str, ...]] = field(default_factory=list)  # the classes of each group

    def __len__(self) -> int:
        return len(self.samples)

    def counts(self) -> list[int]:
        """Images per label: the classes, then the groups."""
        counts = [0] * (len(self.classes) + len(self.groups))
        for _, label in self.samples:
            counts[label] += 1
        return counts

    def group_indices(self) -> list[list[int]]:
        """The class indices of each group (DatasetError for a class not in `classes`)."""
        missing = sorted({name for group in self.groups for name in group} - set(self.classes))
        if missing:
            raise DatasetError(
                f"{self.root}: multi-class folders name {', '.join(missing[:5])}, which are not "
                "among the training classes; add a class folder for each"
            )
        return [[self.classes.index(name) for name in group] for group in self.groups]


def class_label(folder_name: str) -> str:
    """The label of a class folder: its name, with bytes that are not UTF-8 written as \\xNN
    (labels are text stored in model files; the same mapping in train and eval matches them)."""
    return os.fsencode(folder_name).decode("utf-8", "backslashreplace")


def _images_under(folder: str, skipped: list[str]) -> list[str]:
    """Regular image files under `folder`, recursively, in natural order. Links to folders are
    followed once each, never back up the tree (no loops); anything that is not a regular file
    (FIFO, socket, device) is never opened: it is named in `skipped`."""
    found = []
    # The folder's ancestors count as visited: a link back up (`loop -> ..`) would otherwise
    # pull the other classes' images into this one.
    visited: set[tuple[int, int]] = set()
    for ancestor in Path(os.path.realpath(folder)).parents:
        try:
            info = os.stat(ancestor)
        except OSError:
            continue
        visited.add((info.st_dev, info.st_ino))

    def unreadable(error: OSError) -> None:
        skipped.append(
            f"{error.filename or folder}: cannot list folder ({error.strerror or error}); "
            "its images were skipped"
        )

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        try:
            info = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in visited:
            dirs[:] = []
            continue
        visited.add((info.st_dev, info.st_ino))
        # Hidden folders and other runs' outputs (fileio.OUTPUT_MARKER) are not data.
        dirs[:] = [
            d for d in dirs if not d.startswith(".") and not is_output_folder(os.path.join(root, d))
        ]
        for name in files:
            if not is_image_path(name) or name.startswith("."):
                continue
            path = os.path.join(root, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError as error:
                skipped.append(f"{path}: cannot read ({error.strerror or error}); skipped")
                continue
            if regular:
                found.append(path)
            else:
                skipped.append(f"{path}: not a regular file (FIFO, socket or device); skipped")
    return sorted(found, key=natural_key)


def _split_groups(
    names: list[str], known: Sequence[str] = ()
) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """(class folders, {group folder: its class labels}): a "+" folder is a group when it
    names two or more different classes, each a class folder of the same tree or in `known`."""
    known_labels = {class_label(name) for name in names if GROUP_SEPARATOR not in name}
    known_labels.update(known)
    groups: dict[str, tuple[str, ...]] = {}
    for name in names:
        parts = tuple(class_label(part) for part in name.split(GROUP_SEPARATOR))
        if (
            GROUP_SEPARATOR in name
            and len(set(parts)) == len(parts) >= 2
            and all(part in known_labels for part in parts)
        ):
            groups[name] = parts
    return [name for name in names if name not in groups], groups


def scan_image_folder(
    root: str | Path,
    min_classes: int = 2,
    groups: bool = False,
    known: Sequence[str] = (),
) -> LabelledImages:
    """Classes and image paths of an ImageFolder tree, with a DatasetError for unusable layouts.
    `groups` reads "<a>+<b>" folders as images of both classes (see the module docstring),
    where a and b are class folders of this tree or among the `known` classes."""
    root = Path(root).expanduser()
    hint = f"put the images in one subfolder per class, e.g. {root}/cat/1.jpg and {root}/dog/2.jpg"
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; {hint}")
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file, not a folder; {hint}")
    folders = sorted(
        (
            entry.name
            for entry in os.scandir(root)
            if entry.is_dir()
            and not entry.name.startswith(".")
            and not is_output_folder(entry.path)
        ),
        key=natural_key,
    )
    group_folders: dict[str, tuple[str, ...]] = {}
    if groups:
        folders, group_folders = _split_groups(folders, known)
    classes = [class_label(name) for name in folders]
    if not classes and not group_folders:
        loose = [
            name for name in os.listdir(root) if is_image_path(name) and not name.startswith(".")
        ]
        if loose:
            raise DatasetError(
                f"{root}: {len(loose)} images sit directly in the folder without class "
                f"subfolders; {hint}"
            )
        raise DatasetError(f"{root}: empty folder (no class subfolders); {hint}")
    skipped: list[str] = []
    per_class = {
        label: _images_under(str(root / name), skipped) for label, name in zip(classes, folders)
    }
    group_images = {name: _images_under(str(root / name), skipped) for name in group_folders}
    empty = [name for name in classes if not per_class[name]]
    if len(empty) == len(classes) and not any(group_images.values()):
        raise DatasetError(
            f"{root}: no images in any class subfolder (looked for {_EXTENSIONS}); {hint}"
        )
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(
            f"{root}: class folder(s) {shown} contain no images (looked for {_EXTENSIONS}); "
            "add images to them or remove them"
        )
    if len(classes) < min_classes and not (min_classes <= 1 and group_folders):
        raise DatasetError(
            f"{root}: only one class ({classes[0]}); "
            "a classifier needs at least two class subfolders"
        )
    samples = [(path, index) for index, name in enumerate(classes) for path in per_class[name]]
    found_groups: list[tuple[str, ...]] = []
    for name, parts in group_folders.items():
        if not group_images[name]:
            skipped.append(f"{root / name}: no images in this multi-class folder; skipped")
            continue
        label = len(classes) + len(found_groups)
        found_groups.append(parts)
        samples += [(path, label) for path in group_images[name]]
    return LabelledImages(
        root=str(root), classes=classes, samples=samples, skipped=skipped, groups=found_groups
    )


def relabel(
    data: LabelledImages,
    classes: Sequence[str],
    what: str = "validation",
    groups: Sequence[tuple[str, ...]] = (),
) -> LabelledImages:
    """Map `data`'s labels onto `classes` (by name) and its groups onto `groups`, appending the
    groups `groups` lacks; unknown classes are an error."""
    unknown = [name for name in data.classes if name not in classes]
    unknown += sorted({name for group in data.groups for name in group} - set(classes))
    if unknown:
        raise DatasetError(
            f"{data.root}: {what} classes {', '.join(unknown[:5])} are not among the known classes "
            f"({', '.join(list(classes)[:10])}{' ...' if len(classes) > 10 else ''}); "
            "use the same class folder names"
        )
    index = {name: i for i, name in enumerate(classes)}
    remap = [index[name] for name in data.classes]
    all_groups = list(groups) + [group for group in data.groups if group not in groups]
    remap += [len(classes) + all_groups.index(group) for group in data.groups]
    samples = [(path, remap[label]) for path, label in data.samples]
    return LabelledImages(
        root=data.root,
        classes=list(classes),
        samples=samples,
        skipped=data.skipped,
        groups=all_groups,
    )


def stratified_split(
    data: LabelledImages, fraction: float, seed: int
) -> tuple[LabelledImages, LabelledImages]:
    """(train, val): `fraction` of each class (rounded, at least one when the class has two or
    more images, never all of it) drawn with an RNG seeded by `seed`."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"--val-split must be in [0, 1), got {fraction}")
    rng = random.Random(f"val-split:{seed}")
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in data.samples:
        by_class.setdefault(sample[1], []).append(sample)
    for label in sorted(by_class):
        items = list(by_class[label])
        rng.shuffle(items)
        count = len(items)
        take = 0 if fraction == 0 or count < 2 else min(max(1, round(count * fraction)), count - 1)
        val_set = {path for path, _ in items[:take]}
        val.extend(s for s in by_class[label] if s[0] in val_set)  # keep natural order inside
        train.extend(s for s in by_class[label] if s[0] not in val_set)
    return (
        LabelledImages(
            root=data.root,
            classes=data.classes,
            samples=train,
            skipped=data.skipped,
            groups=data.groups,
        ),
        LabelledImages(root=data.root, classes=data.classes, samples=val, groups=data.groups),
    )


def load_datasets(
    train_dir: str | Path, val_dir: str | Path | None = None, val_split: float = 0.0, seed: int = 0
) -> tuple[LabelledImages, LabelledImages | None]:
    """The training set and the validation set (a folder, a stratified split, or none)."""
    if val_dir is not None and val_split > 0:
        raise DatasetError("pass either --val DIR or --val-split F, not both")
    train = scan_image_folder(train_dir, groups=True)
    if val_dir is not None:
        val = scan_image_folder(val_dir, min_classes=1, groups=True, known=train.classes)
        val = relabel(val, train.classes, groups=train.groups)
        train.groups = list(val.groups)  # train's groups first: its labels stay as they are
        return train, val
    if val_split > 0:
        train, val = stratified_split(train, val_split, seed)
        return train, (val if len(val) else None)
    return train, None
