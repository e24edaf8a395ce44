"""`DataConfig`: every knob of the data pipeline, typed and frozen.

Built by `neva_jax.config` from the experiment file's `data` section (keys are
these field names). Three fields describe the model rather than the data and are
filled in by whoever knows the model (the trainer, `inspect`/`validate`):
`image_size`, `num_image_slots` (the vision tower's patch count P, plus one if
the class token is kept) and `use_im_start_end`; 0 means "not set yet".
"""

from __future__ import annotations

import dataclasses
import os

from neva_jax.data.conversation import TEMPLATES
from neva_jax.data.image import ASPECT_MODES, CLIP_MEAN, CLIP_STD

TFDS_PREFIX = "tfds:"
TRUNCATION_MODES = ("tokens", "drop_rounds")


def _as_tuple(value: object) -> tuple:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data pipeline settings (see `neva_jax.data.pipeline` for how they are used).

    Files are LLaVA JSON lists or JSONL (one record per line), or `tfds:NAME:SPLIT`
    (an array_record TFDS dataset read with `tfds.data_source`; NAME may carry
    `/config` and `:version`).
    """

    train_files: str | tuple[str, ...] = ()  # one path or several (blended by weights)
    eval_files: str | tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # one per train file; () = proportional to size
    image_folder: str = ""  # image paths in records resolve inside this folder
    tfds_data_dir: str = ""  # data_dir for tfds: sources ("" = TFDS default)
    template: str = "vicuna_v1"
    system_prompt: str | None = None  # None = the template's default; "" = none
    tokenizer: str = ""  # folder for transformers.AutoTokenizer
    image_aspect_ratio: str = "square"  # square | pad | keep
    image_size: int = 0  # pixels; 0 = take the vision tower's
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    num_image_slots: int = 0  # tokens per image; 0 = take the vision tower's
    use_im_start_end: bool = False
    max_images_per_row: int = 1  # M in the batch; with packing, bounds samples per row
    max_seq_len: int = 2048  # T in the batch (static)
    # Over-long samples: "tokens" keeps the first max_seq_len tokens (LLaVA's
    # model_max_length cut after image expansion, NeMo's context_length cut: a partly
    # cut answer is trained); "drop_rounds" drops whole trailing rounds first.
    truncation: str = "tokens"
    packing: bool = False
    # LLaVA's group_by_modality_length: every batch all-image or all-text, each
    # modality in length-grouped megabatches (neva_jax.data.grouping); JSON/JSONL only.
    group_by_modality_length: bool = False
    batch_size: int = 8  # global rows per batch (split over processes)
    shuffle: bool = True
    seed: int = 0
    num_epochs: int = 0  # training passes; 0 = repeat forever (the trainer counts steps)
    num_workers: int = 0  # grain worker processes for decoding; 0 = in-process threads
    worker_buffer_size: int = 2
    read_threads: int = 4
    prefetch_buffer_size: int = 16
    strict: bool = False  # stop at the first bad sample
    max_skip_ratio: float = 0.01  # stop when skipped/read exceeds this ...
    skip_ratio_min_samples: int = 100  # ... once at least this many samples were read

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "train_files", _as_tuple(self.train_files))
        set_(self, "eval_files", _as_tuple(self.eval_files))
        set_(self, "weights", tuple(float(w) for w in _as_tuple(self.weights)))
        set_(self, "image_mean", tuple(float(x) for x in self.image_mean))
        set_(self, "image_std", tuple(float(x) for x in self.image_std))

    def with_model(
        self, *, image_size: int, num_image_slots: int, use_im_start_end: bool
    ) -> DataConfig:
        """Fills in the model-dependent fields. A value the config sets must be the model's
        (ValueError naming the key otherwise): the data cannot feed the model another
        image size, slot count or start/end tokens than it was built with."""
        model = {
            "image_size": image_size,
            "num_image_slots": num_image_slots,
            "use_im_start_end": use_im_start_end,
        }
        for key, value in model.items():
            ours = getattr(self, key)
            if ours and ours != value:
                raise ValueError(
                    f"config.data.{key}={ours!r}: the model's is {value!r} (set by "
                    "model.vision_encoder.* and model.use_im_start_end); leave the data key "
                    "unset to take it"
                )
        return dataclasses.replace(self, **model)

    def validate(self, *, check_files: bool = True) -> None:
        """Raises ValueError (one line naming `config.data.KEY`) on a bad setting."""

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"config.data.{msg}")

        check(
            self.template in TEMPLATES,
            f"template={self.template!r}: unknown; use one of {', '.join(TEMPLATES)}",
        )
        check(
            self.image_aspect_ratio in ASPECT_MODES,
            f"image_aspect_ratio={self.image_aspect_ratio!r}: use one of {', '.join(ASPECT_MODES)}",
        )
        check(
            not self.weights or len(self.weights) == len(self.train_files),
            f"weights={list(self.weights)}: need one weight per train file "
            f"({len(self.train_files)}), or none",
        )
        check(all(w > 0 for w in self.weights), f"weights={list(self.weights)}: must be > 0")
        check(
            not (self.weights and self.group_by_modality_length),
            "weights: not used with group_by_modality_length=True (the files are "
            "concatenated, every record once per epoch, as in LLaVA); remove them",
        )
        check(self.max_seq_len >= 2, f"max_seq_len={self.max_seq_len}: must be >= 2")
        check(
            self.truncation in TRUNCATION_MODES,
            f"truncation={self.truncation!r}: use one of {', '.join(TRUNCATION_MODES)}",
        )
        check(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        check(
            self.max_images_per_row >= 0,
            f"max_images_per_row={self.max_images_per_row}: must be >= 0",
        )
        check(
            0.0 <= self.max_skip_ratio <= 1.0,
            f"max_skip_ratio={self.max_skip_ratio}: must be in [0, 1]",
        )
        check(self.num_workers >= 0, f"num_workers={self.num_workers}: must be >= 0")
        for key in ("read_threads", "worker_buffer_size", "prefetch_buffer_size"):
            value = getattr(self, key)
            check(value >= (1 if key == "read_threads" else 0), f"{key}={value}: must be >= "
                  f"{1 if key == 'read_threads' else 0}")  # fmt: skip
        check(
            self.skip_ratio_min_samples >= 0,
            f"skip_ratio_min_samples={self.skip_ratio_min_samples}: must be >= 0",
        )
        check(
            all(x > 0 for x in self.image_std),
            f"image_std={list(self.image_std)}: every value must be > 0 (it divides the pixels)",
        )
        check(self.num_epochs >= 0, f"num_epochs={self.num_epochs}: must be >= 0 (0 = forever)")
        check(
            len(self.image_mean) == 3 and len(self.image_std) == 3,
            "image_mean/image_std: need 3 values each",
        )
        if self.num_image_slots and self.max_images_per_row:
            need = self.num_image_slots + (2 if self.use_im_start_end else 0)
            check(
                self.max_seq_len > need,
                f"max_seq_len={self.max_seq_len}: one image alone takes {need} tokens; raise it",
            )
        if not check_files:
            return
        check(bool(self.tokenizer), "tokenizer is empty; set it to a tokenizer folder")
        check(
            os.path.isdir(self.tokenizer),
            f"tokenizer={self.tokenizer!r}: no such folder",
        )
        for key in ("train_files", "eval_files"):
            for f in getattr(self, key):
                check(
                    f.startswith(TFDS_PREFIX) or os.path.isfile(f),
                    f"{key}: {f!r} does not exist; fix the path (JSON, JSONL or tfds:NAME:SPLIT)",
                )
        check(
            not self.image_folder or os.path.isdir(self.image_folder),
            f"image_folder={self.image_folder!r}: no such folder",
        )

    def require_model_fields(self) -> None:
        """Raises ValueError unless `image_size` and `num_image_slots` are set."""
        for key in ("image_size", "num_image_slots"):
            if getattr(self, key) <= 0:
                raise ValueError(
                    f"config.data.{key} is not set: build the pipeline with "
                    "cfg.with_model(image_size=..., num_image_slots=..., use_im_start_end=...) "
                    "from the vision tower's settings"
                )
