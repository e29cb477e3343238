# Generated from openapi.yaml by datamodel-code-generator (scripts/generate-models); do not edit.

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class Error(BaseModel):
    path: Annotated[
        str, Field(examples=["epochs", "file", "class:daisy", "image[0] (rose.jpg)"])
    ]
    reason: str


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: Annotated[
        Optional[list[Error]],
        Field(
            description="The offending inputs, where each is and what is wrong (at most the first 100).",
            max_length=100,
        ),
    ] = None
    errors_omitted: Annotated[
        Optional[int],
        Field(description="How many more errors there were beyond those listed.", ge=1),
    ] = None


class Progress(BaseModel):
    """
    While ingesting, how far it has got; null once ready.
    """

    stage: Optional[Literal["reading", "decoding", "storing"]] = None
    done: Optional[int] = None
    total: Optional[int] = None


class Counts(BaseModel):
    """
    Images per class in each split.
    """

    train: Optional[dict[str, int]] = None
    val: Optional[dict[str, int]] = None
    test: Optional[dict[str, int]] = None


class SkippedItem(BaseModel):
    path: Optional[str] = None
    reason: Optional[str] = None


class Report(BaseModel):
    skipped: Optional[list[SkippedItem]] = None
    duplicates: Annotated[
        Optional[list[list[str]]],
        Field(description="Groups of files with identical bytes."),
    ] = None
    leakage: Annotated[
        Optional[list[list[str]]],
        Field(
            description="Duplicate groups spread over more than one split (the validation or test score would flatter the model)."
        ),
    ] = None
    skipped_omitted: Annotated[
        Optional[int], Field(description="Skipped files beyond the first 1000 listed.")
    ] = None
    duplicates_omitted: Annotated[
        Optional[int],
        Field(description="Duplicate groups beyond the first 1000 listed."),
    ] = None
    leakage_omitted: Annotated[
        Optional[int], Field(description="Leaking groups beyond the first 1000 listed.")
    ] = None


class Dataset(BaseModel):
    id: UUID
    name: str
    status: Annotated[
        Literal["ingesting", "ready", "failed", "deleted"],
        Field(
            description="`ingesting` while the upload is decoded (see `progress`); only `ready` datasets can be trained on."
        ),
    ]
    progress: Annotated[
        Optional[Progress],
        Field(description="While ingesting, how far it has got; null once ready."),
    ] = None
    classes: Annotated[
        list[str],
        Field(description="Class names, sorted; a label index refers to this list."),
    ]
    counts: Annotated[Counts, Field(description="Images per class in each split.")]
    num_train: int
    num_val: int
    num_test: Annotated[
        int,
        Field(
            description="Images held out for the final test (0 without a test split)."
        ),
    ]
    stored_size: Annotated[int, Field(description="Side the images are stored at.")]
    bytes: Annotated[int, Field(description="Size of the uploaded archive.")]
    report: Report
    created_at: AwareDatetime


class Augmentation(BaseModel):
    """
    Applied to training batches only, as tensor ops on the training
    device, seeded. The default is the classic recipe: horizontal flip,
    rotation ±20°, zoom 0.2.

    """

    model_config = ConfigDict(
        extra="forbid",
    )
    enabled: Optional[bool] = True
    horizontal_flip: Optional[bool] = True
    vertical_flip: Optional[bool] = False
    rotation_degrees: Annotated[Optional[float], Field(ge=0.0, le=180.0)] = 20
    zoom: Annotated[Optional[float], Field(ge=0.0, le=0.9)] = 0.2
    min_crop_area: Annotated[
        Optional[float],
        Field(description="Random resized crop (1 = off).", ge=0.05, le=1.0),
    ] = 1
    brightness: Annotated[Optional[float], Field(ge=0.0, le=0.9)] = 0
    contrast: Annotated[Optional[float], Field(ge=0.0, le=0.9)] = 0
    saturation: Annotated[Optional[float], Field(ge=0.0, le=0.9)] = 0


class JobConfig(BaseModel):
    """
    The validated configuration, every default filled in (the fields of JobRequest but dataset_id, priority and max_attempts).
    """

    model_config = ConfigDict(
        extra="allow",
    )


class Progress1(BaseModel):
    """
    Within the running epoch.
    """

    epoch: Optional[int] = None
    step: Optional[int] = None
    steps: Optional[int] = None
    images_per_second: Optional[float] = None
    eta_seconds: Optional[float] = None
    loss: Annotated[
        Optional[float], Field(description="Mean training loss of the epoch so far.")
    ] = None


class TestMetrics(BaseModel):
    """
    The best checkpoint's scores on the dataset's test split, measured once at the end (null without a test split).
    """

    epoch: Optional[int] = None
    images: Optional[int] = None
    loss: Optional[float] = None
    accuracy: Optional[float] = None
    macro_f1: Optional[float] = None
    top_k: Optional[int] = None
    top_k_accuracy: Optional[float] = None
    per_class: Optional[list[dict[str, Any]]] = None
    confusion_matrix: Optional[list[list[int]]] = None


class Run(BaseModel):
    id: Optional[UUID] = None
    attempt: Optional[int] = None
    worker: Optional[str] = None
    device: Optional[str] = None
    started_at: Optional[AwareDatetime] = None
    finished_at: Optional[AwareDatetime] = None
    outcome: Optional[Literal["succeeded", "failed", "cancelled", "lost"]] = None
    error: Optional[str] = None
    resumed_from_epoch: Optional[int] = None
    cached_features: Optional[bool] = None
    precision: Annotated[
        Optional[Literal["fp32", "bf16-autocast"]],
        Field(description="What the training steps computed in."),
    ] = None


class Job(BaseModel):
    id: UUID
    dataset_id: UUID
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    config: JobConfig
    priority: Optional[int] = None
    attempts: int
    max_attempts: int
    epoch: Annotated[int, Field(description="Last finished epoch.")]
    epochs: int
    progress: Annotated[
        Optional[Progress1], Field(description="Within the running epoch.")
    ] = None
    cancel_requested: Optional[bool] = None
    best_epoch: Optional[int] = None
    best_val_accuracy: Optional[float] = None
    error: Optional[str] = None
    model_id: Optional[UUID] = None
    test_metrics: Annotated[
        Optional[TestMetrics],
        Field(
            description="The best checkpoint's scores on the dataset's test split, measured once at the end (null without a test split)."
        ),
    ] = None
    runs: Annotated[
        Optional[list[Run]],
        Field(description="The job's attempts (in `GET /jobs/{id}` only)."),
    ] = None
    created_at: AwareDatetime
    started_at: Optional[AwareDatetime] = None
    finished_at: Optional[AwareDatetime] = None
    updated_at: AwareDatetime


class PerClassItem(BaseModel):
    label: Optional[str] = None
    precision: Optional[float] = None
    recall: Optional[float] = None
    f1: Optional[float] = None
    support: Optional[int] = None


class EpochMetrics(BaseModel):
    epoch: Optional[int] = None
    train_loss: Optional[float] = None
    train_accuracy: Optional[float] = None
    val_loss: Optional[float] = None
    val_accuracy: Optional[float] = None
    val_macro_f1: Optional[float] = None
    top_k: Optional[int] = None
    val_top_k_accuracy: Optional[float] = None
    learning_rate: Annotated[
        Optional[float],
        Field(description="The head's learning rate at the epoch's last step."),
    ] = None
    frozen_stages: Annotated[
        Optional[int],
        Field(description="Leading backbone stages frozen in this epoch."),
    ] = None
    images_per_second: Optional[float] = None
    seconds: Optional[float] = None
    per_class: Optional[list[PerClassItem]] = None
    confusion_matrix: Annotated[
        Optional[list[list[int]]],
        Field(
            description="Rows are true labels, columns predicted labels, in label order."
        ),
    ] = None


class Prediction(BaseModel):
    label: Optional[str] = None
    score: Optional[float] = None


class Result(BaseModel):
    filename: Optional[str] = None
    predictions: Optional[list[Prediction]] = None
    error: Annotated[
        Optional[str], Field(description="Why this image has no predictions.")
    ] = None


class PredictResponse(BaseModel):
    model_id: UUID
    results: list[Result]
    elapsed_ms: float


class Normalization(BaseModel):
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None


class Model(BaseModel):
    id: Optional[UUID] = None
    job_id: Optional[UUID] = None
    dataset_id: Optional[UUID] = None
    backbone: Optional[str] = None
    labels: Optional[list[str]] = None
    image_size: Optional[int] = None
    stored_size: Annotated[
        Optional[int],
        Field(
            description="Side /predict decodes images to (shorter side, then the centre square) before the model's own crop and resize: its dataset's stored_size."
        ),
    ] = None
    normalization: Optional[Normalization] = None
    epoch: Annotated[Optional[int], Field(description="The best epoch.")] = None
    metrics: Optional[EpochMetrics] = None
    aliases: Optional[list[str]] = None
    created_at: Optional[AwareDatetime] = None


class Backbone(BaseModel):
    name: Annotated[str, Field(examples=["mobilenet_v2", "efficientnet_lite0"])]
    family: Annotated[
        str, Field(examples=["MobileNetV2", "EfficientNet-Lite", "TorchScript"])
    ]
    parameters: Annotated[
        int,
        Field(
            description="Parameters of the feature extractor (without any classifier)."
        ),
    ]
    feature_dim: int
    default_image_size: Annotated[
        int,
        Field(
            description="The input side the weights were trained at; a job's image_size defaults to it."
        ),
    ]
    imagenet_top1: Annotated[
        Optional[float],
        Field(
            description="ImageNet-1k top-1 accuracy of these weights as published, percent (for importable architectures, torchvision's IMAGENET1K_V1); null for uploaded modules."
        ),
    ] = None
    bundled: Annotated[
        bool,
        Field(
            description="Whether setup installs the weights; otherwise users bring them with `finetuned weights import FILE --arch NAME` (or upload a module)."
        ),
    ]
    normalization: Normalization
    weights_source: str
    weights: Annotated[
        bool, Field(description="Whether the pretrained weights are installed.")
    ]
    stages: Annotated[
        list[str],
        Field(description="Backbone stages, first to last, as freezing counts them."),
    ]
    uploaded: Annotated[
        bool, Field(description="Whether a user uploaded it with POST /backbones.")
    ]
    removed_layer: Annotated[
        Optional[str],
        Field(
            description="Uploaded modules whose forward returned logits: the final linear layer removed."
        ),
    ] = None


class JobRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
    )
    dataset_id: UUID
    backbone: Optional[str] = "mobilenet_v2"
    epochs: Annotated[Optional[int], Field(ge=1, le=1000)] = 5
    batch_size: Annotated[Optional[int], Field(ge=1, le=4096)] = 32
    image_size: Annotated[
        Optional[int],
        Field(
            description="Model input side in pixels; the backbone's own size (224) by default.",
            ge=32,
            le=1024,
        ),
    ] = None
    seed: Annotated[Optional[int], Field(ge=0)] = 0
    learning_rate: Annotated[Optional[float], Field(ge=1e-08, le=10.0)] = 0.001
    pretrained: Annotated[
        Optional[bool],
        Field(
            description="Start from the backbone's ImageNet weights; false trains from random initialization (a baseline; needs freeze full)."
        ),
    ] = True
    freeze: Annotated[
        Optional[Literal["head", "last_n", "full", "gradual"]],
        Field(
            description="`head`: only the new head trains; `last_n`: the last\n`trainable_stages` backbone stages train too; `full`: every layer;\n`gradual`: the head first, then one more stage from the top every\n`unfreeze_every` epochs. `GET /backbones` lists each backbone's stages.\n"
        ),
    ] = "head"
    trainable_stages: Annotated[Optional[int], Field(ge=1)] = 2
    unfreeze_every: Annotated[Optional[int], Field(ge=1)] = 1
    frozen_batchnorm: Annotated[
        Optional[bool],
        Field(
            description="Frozen stages keep their BatchNorm statistics (eval mode); false lets them adapt."
        ),
    ] = True
    lr_stage_factor: Annotated[
        Optional[float],
        Field(
            description="Discriminative learning rates; stage i of n learns at learning_rate × factor^(n − i).",
            ge=0.01,
            le=1.0,
        ),
    ] = 1
    optimizer: Optional[Literal["sgd", "adam", "adamw"]] = "adam"
    momentum: Annotated[
        Optional[float], Field(description="SGD only.", ge=0.0, le=0.999)
    ] = 0.9
    nesterov: Annotated[Optional[bool], Field(description="SGD only.")] = False
    weight_decay: Annotated[Optional[float], Field(ge=0.0, le=1.0)] = 0
    gradient_clip_norm: Annotated[
        Optional[float], Field(description="Clip the global gradient norm.", gt=0.0)
    ] = None
    schedule: Optional[Literal["constant", "step", "cosine", "one_cycle"]] = "constant"
    step_size: Annotated[
        Optional[int],
        Field(
            description="`step` schedule: epochs between decays (default epochs / 3).",
            ge=1,
        ),
    ] = None
    step_gamma: Annotated[Optional[float], Field(ge=0.0001, le=1.0)] = 0.1
    warmup_epochs: Annotated[
        Optional[float],
        Field(description="Linear warmup, in (fractional) epochs.", ge=0.0),
    ] = 0
    label_smoothing: Annotated[Optional[float], Field(ge=0.0, le=0.5)] = 0
    class_weights: Annotated[
        Optional[Literal["none", "auto"]],
        Field(description="`auto`: weight the loss by inverse class frequency."),
    ] = "none"
    augmentation: Optional[Augmentation] = None
    cache_features: Annotated[
        Optional[bool],
        Field(
            description="With `freeze: head` and no augmentation (or horizontal flips\nonly), compute the backbone's features once and train the head on\nthem: epochs then cost almost nothing.\n"
        ),
    ] = True
    mixed_precision: Annotated[
        Optional[bool],
        Field(
            description="On a CUDA device that supports bf16, run the training steps under\nautocast in bf16 (no loss scaling needed); the run's `precision`\nsays what was used. The CPU always trains in fp32.\n"
        ),
    ] = True
    early_stopping_patience: Annotated[
        Optional[int],
        Field(
            description="Stop after this many epochs without improvement of the selection metric.",
            ge=1,
        ),
    ] = None
    selection_metric: Annotated[
        Optional[Literal["val_accuracy", "val_loss", "val_macro_f1"]],
        Field(description="Picks the best checkpoint (and drives early stopping)."),
    ] = "val_accuracy"
    priority: Annotated[Optional[int], Field(ge=-1000, le=1000)] = 0
    max_attempts: Annotated[Optional[int], Field(ge=1, le=20)] = 3
