"""Semi-supervised segmentation data from Hugging Face `datasets`.

The pieces, in the order a training run uses them ([`build_training_data`] assembles them from [`DataArguments`]):

1. `loading`: [`load_segmentation_dataset`] turns a name into a `datasets.DatasetDict` (a `save_to_disk` folder, a
   folder of parquet files, an `imagefolder` folder, a Hub id, or `"synthetic"` for the generated dataset of
   `synthetic`); `class_names` reads and stores the class names that come with it.
2. `splits`: [`select_labeled_indices`] picks the labelled rows of the train split (an official split file of ids,
   a fraction or a count); [`split_fingerprint`] names that choice so a run can record it;
   [`make_labeled_partitions`] writes seeded 1/16 .. 1/2 split files for any dataset.
3. `segmentation_dataset`: [`SemiSupervisedSegmentationDataset`] pairs every unlabelled sample with a labelled one
   (and, for CutMix, a second unlabelled sample and a box mask), decoded by `decoding` and augmented with the
   [`SegmentationTransform`] of `transforms`; [`SupervisedSegmentationDataset`] serves an evaluation split (or a
   supervised-only training set).
4. `collation`: [`collate_semi_supervised`] stacks items into a batch.
5. `streaming` (`--unlabeled_streaming`): [`UnlabeledImageStream`] streams a separate unlabelled pool of any size
   (split across processes, endless, exactly resumable); the trainer joins its batches ([`UnlabeledBatches`]) to
   the labelled ones.

`converters` turns CamVid, PASCAL VOC, Cityscapes and plain image/mask folders into such datasets
(`scripts/prepare_dataset.py`).
"""

from .class_names import (
    CLASS_NAMES_FILE,
    dataset_class_names,
    read_id2label,
    set_dataset_class_names,
    write_id2label,
)
from .collation import collate_semi_supervised
from .decoding import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    MASK_MODES,
    UndecodableSampleError,
    check_mask_values,
    decode_image,
    decode_mask,
)
from .loading import check_columns, get_split, load_segmentation_dataset
from .segmentation_dataset import (
    SemiSupervisedSegmentationDataset,
    SplitName,
    SupervisedSegmentationDataset,
    item_seed,
)
from .splits import (
    complement_indices,
    file_sha256,
    fraction_tag,
    make_labeled_partitions,
    parse_fraction,
    read_split_ids,
    select_indices_from_ids_file,
    select_labeled_indices,
    split_fingerprint,
    split_line_id,
    write_labeled_partitions,
)
from .streaming import (
    StreamPosition,
    UnlabeledBatches,
    UnlabeledImageStream,
    read_stream_position,
    write_stream_position,
)
from .training_data import (
    DataArguments,
    TrainingData,
    build_training_data,
    build_unlabeled_stream,
    resolve_class_names,
    split_record,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PAPER_SCALES, SegmentationTransform, size_pair

__all__ = [
    "CLASS_NAMES_FILE",
    "DataArguments",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "MASK_MODES",
    "PAPER_SCALES",
    "SegmentationTransform",
    "SemiSupervisedSegmentationDataset",
    "SplitName",
    "StreamPosition",
    "SupervisedSegmentationDataset",
    "TrainingData",
    "UndecodableSampleError",
    "UnlabeledBatches",
    "UnlabeledImageStream",
    "build_training_data",
    "build_unlabeled_stream",
    "check_columns",
    "check_mask_values",
    "collate_semi_supervised",
    "complement_indices",
    "dataset_class_names",
    "decode_image",
    "decode_mask",
    "file_sha256",
    "fraction_tag",
    "get_split",
    "item_seed",
    "load_segmentation_dataset",
    "make_labeled_partitions",
    "parse_fraction",
    "read_id2label",
    "read_split_ids",
    "read_stream_position",
    "resolve_class_names",
    "select_indices_from_ids_file",
    "select_labeled_indices",
    "set_dataset_class_names",
    "size_pair",
    "split_fingerprint",
    "split_line_id",
    "split_record",
    "write_id2label",
    "write_labeled_partitions",
    "write_stream_position",
]
