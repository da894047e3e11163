"""Class lists travel with every model and data set; these checks compare them before any work.

A classifier folder lists its classes in ``meta.json``, a generator in ``dpt_meta.json``, a
synthetic set in its manifest's ``class_name`` column. Label ids are positions in those lists, so
a model meets data only when the names agree position by position: the same number of classes is
not enough (a model trained on folders a, b, c scores a third on a, b, x and says nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from semivit.config.schema import DataConfig
from semivit.errors import ClassMismatchError
from semivit.runtime.layout import META

SHOWN = 5  # class names shown per list in a message


def describe_classes(classes: Sequence[str]) -> str:
    """``3 classes ['a', 'b', 'c']``; long lists show their first names and how many more."""
    names = [str(c) for c in classes]
    head = ", ".join(repr(n) for n in names[:SHOWN])
    more = f", ... +{len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"{len(names)} class{'' if len(names) == 1 else 'es'} [{head}{more}]"


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # the shorter list ends the comparison
        if x != y:
            return f"; they first differ at label {i}: '{x}' vs '{y}'"
    return ""


def check_same_classes(
    have: Sequence[str], have_what: str, want: Sequence[str], want_what: str, fix: str, error=ClassMismatchError
) -> None:
    """``have`` (a model's classes) must equal ``want`` (the data's), names and order."""
    have, want = [str(c) for c in have], [str(c) for c in want]
    if have == want:
        return
    order = " (same names, another order)" if sorted(have) == sorted(want) else ""
    raise error(
        f"{have_what} has {describe_classes(have)} but {want_what} has {describe_classes(want)}{order}"
        f"{_first_difference(have, want)}; {fix}"
    )


def check_known_classes(
    names: Sequence[str], names_what: str, known: Sequence[str], known_what: str, fix: str, error=ClassMismatchError
) -> None:
    """Every name of ``names`` (e.g. a synthetic set's, which may cover some classes only) is in ``known``."""
    unknown = sorted(set(map(str, names)) - set(map(str, known)))
    if unknown:
        raise error(
            f"{names_what} has classes that {known_what} does not: {describe_classes(unknown)}; "
            f"{known_what} has {describe_classes(known)}; {fix}"
        )


def data_description(dcfg: DataConfig) -> str:
    return f"data '{dcfg.name}'" + (f" (data.root='{dcfg.root}')" if dcfg.root else "")


def data_class_names(dcfg: DataConfig) -> list[str] | None:
    """The configured data set's class list without reading its images: the class folder names of
    ``data.root/labeled`` or ``data.root/train`` (or data.labeled_csv's labels) for imagefolder, the loader's own list
    for the in-memory sets; None when it cannot be known cheaply (no root yet, CIFAR on disk)."""
    if dcfg.name == "imagefolder":
        from semivit.data.sources import imagefolder_class_names

        return imagefolder_class_names(dcfg)
    if dcfg.name in ("mnist5k", "digits"):
        from semivit.data.sources import build_data

        return list(build_data(dcfg).classes)
    return None


def check_classifier_classes(
    path: str | Path, classes: Sequence[str], dcfg: DataConfig, what: str, fix: str, error=ClassMismatchError
) -> None:
    """A classifier to start from (its folder, or a weights file inside one) must be of the data's
    classes: its head's rows are kept and mean those classes. Weights without a ``meta.json`` next
    to them (an MAE encoder, a foreign checkpoint) carry no class list and pass."""
    from semivit.models.classifier import read_classifier_meta

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / META).is_file():
        check_same_classes(
            read_classifier_meta(folder)["classes"], f"{what} '{folder}'", classes, data_description(dcfg), fix, error
        )
