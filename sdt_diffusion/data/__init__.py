"""The data layer, below training and evaluation: the one reader of labelled images and of the latent cache.

Diffusion training, latent extraction, classifier training and ``eval/classify.py`` all read their data here. It
imports :mod:`sdt_diffusion.utils` only, never training or evaluation.

- :mod:`.images`: class folders, ``save_to_disk`` datasets and ``load_dataset`` datasets (:func:`open_dataset`,
  ``--dataset``) as :class:`LabelledImages` (one hidden-file rule,
  one image-extension rule, one way to open an image, :func:`to_rgb`: 16-bit images scaled
  to 8 bits, 32-bit and float ones refused), the label-range check, the unreadable-image scan
  (:func:`verify_images`: ``--verify-images`` of both trainers and latent extraction) and the input errors
  (:class:`DataInputError`, a :class:`~sdt_diffusion.utils.errors.ConfigError`);
- :mod:`.transforms`: ADM's centre crop and :class:`ImageClassDataset` (diffusion), :class:`TransformedImages`
  (classifiers);
- :mod:`.latents`: the latent cache (format constants, metadata reader, :class:`LatentCacheDataset`);
- :mod:`.sampling`: the seeded :class:`EpochSampler` and the resumable batch stream :func:`iterate_batches`.
"""

from .images import (
    AUTO_VERIFY_LIMIT,
    DATASET_HELP,
    EIGHT_BIT_MODES,
    IMAGE_EXTENSIONS,
    MAX_RESOLUTION,
    VERIFY_IMAGES,
    DataInputError,
    FolderRows,
    LabelledImages,
    UnreadableImageError,
    check_labels,
    class_names_to_id2label,
    find_unreadable_images,
    image_mode_problem,
    is_saved_dataset,
    is_visible,
    load_hf_dataset,
    load_image_folder,
    load_image_source,
    load_saved_dataset,
    open_dataset,
    open_image,
    open_labelled_images,
    parse_data_files,
    refuse_streaming,
    to_rgb,
    verify_images,
)
from .latents import CACHE_FORMAT, CACHE_VERSION, LatentCacheDataset, read_cache_metadata
from .sampling import EpochSampler, iterate_batches
from .transforms import ImageClassDataset, TransformedImages, center_crop_arr, pil_to_tensor

__all__ = [
    "AUTO_VERIFY_LIMIT",
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DATASET_HELP",
    "EIGHT_BIT_MODES",
    "IMAGE_EXTENSIONS",
    "MAX_RESOLUTION",
    "VERIFY_IMAGES",
    "DataInputError",
    "EpochSampler",
    "FolderRows",
    "ImageClassDataset",
    "LabelledImages",
    "LatentCacheDataset",
    "TransformedImages",
    "UnreadableImageError",
    "center_crop_arr",
    "check_labels",
    "class_names_to_id2label",
    "find_unreadable_images",
    "image_mode_problem",
    "is_saved_dataset",
    "is_visible",
    "iterate_batches",
    "load_hf_dataset",
    "load_image_folder",
    "load_image_source",
    "load_saved_dataset",
    "open_dataset",
    "open_image",
    "open_labelled_images",
    "parse_data_files",
    "pil_to_tensor",
    "read_cache_metadata",
    "refuse_streaming",
    "to_rgb",
    "verify_images",
]
