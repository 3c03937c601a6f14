"""Converters from common on-disk segmentation layouts to the `datasets.DatasetDict` the project trains on.

Every converter returns splits with the columns `id` (`str`), `image` (`datasets.Image`) and `label`
(`datasets.Image`: single-channel PNG of class ids, 255 = ignore), and the class names as JSON
`{"class_names": [...]}` in each split's `info.description` (the convention of the synthetic dataset, read back by
[`~cps_hf.data.dataset_class_names`]). Image files are stored as their original bytes; a mask is re-encoded only
when its values are remapped (e.g. CamVid's void id 11 becomes 255, Cityscapes labelIds become trainIds).

Conversion streams: rows are written one by one to Arrow files in the `datasets` cache (`HF_DATASETS_CACHE`), so
memory does not grow with the dataset; a conversion of unchanged source files (same paths, sizes and modification
times) reuses them.

    >>> from pathlib import Path
    >>> from cps_hf.data.converters import convert_voc, save_dataset
    >>> dataset_dict = convert_voc(Path("VOCdevkit"))  # doctest: +SKIP
    >>> save_dataset(dataset_dict, Path("data/voc"), parquet=True)  # doctest: +SKIP
"""

from .camvid import CAMVID_CLASS_NAMES, CAMVID_VOID_ID, convert_camvid
from .cityscapes import CITYSCAPES_CLASS_NAMES, CITYSCAPES_LABEL_ID_TO_TRAIN_ID, convert_cityscapes
from .folder import convert_folder
from .storage import downscale_dataset, push_dataset_to_hub, save_dataset
from .voc import VOC_CLASS_NAMES, convert_voc

__all__ = [
    "CAMVID_CLASS_NAMES",
    "CAMVID_VOID_ID",
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "VOC_CLASS_NAMES",
    "convert_camvid",
    "convert_cityscapes",
    "convert_folder",
    "convert_voc",
    "downscale_dataset",
    "push_dataset_to_hub",
    "save_dataset",
]
