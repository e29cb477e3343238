"""Python client for the finetuned HTTP API: upload, train, wait, predict, deploy."""

from ._client import AsyncClient, AsyncJobPage, Client, JobOptions, JobPage
from ._errors import (APIError, BadRequest, Conflict, ErrorDetail, FinetunedError, Forbidden,
                      InsufficientStorage, NotFound, PayloadTooLarge, RateLimited, ServerError,
                      ServiceUnavailable, Unauthorized, Unprocessable, UnsupportedMediaType)
from ._models import Augmentation, Backbone, Dataset, EpochMetrics, Job, Model, Prediction, PredictResponse
from ._models import Result as PredictResult

__version__ = "0.1.0"
__all__ = [
    "APIError", "AsyncClient", "AsyncJobPage", "Augmentation", "Backbone", "BadRequest", "Client", "Conflict",
    "Dataset", "EpochMetrics", "ErrorDetail", "FinetunedError", "Forbidden", "InsufficientStorage", "Job",
    "JobOptions", "JobPage", "Model", "NotFound", "PayloadTooLarge", "PredictResponse", "PredictResult",
    "Prediction", "RateLimited", "ServerError", "ServiceUnavailable", "Unauthorized", "Unprocessable",
    "UnsupportedMediaType",
]
