"""Training and fine-tuning DiT4SR (the CLI is ``python -m dit4sr.train``), one module per job:

* ``config`` — the YAML training configuration;
* ``model`` — building or loading the model, exporting pipeline roots, the prompt conditioning;
* ``trainer`` — device and precision, the training loop, checkpoints and resuming;
* ``data`` — training pairs synthesised from image folders, sharded per worker, prefetched;
* ``distributed`` — data-parallel runs under Ray Train (the only module that imports Ray, and only when called).
"""

from .config import TrainConfig, load_config
from .data import list_images, read_list
from .errors import TrainingInputError
from .model import build_model, resolve_prompt_embeddings, write_pipeline_root
from .trainer import Trainer, resolve_precision, resolve_training_device, seed_everything

__all__ = ["TrainConfig", "Trainer", "TrainingInputError", "build_model", "list_images", "load_config", "read_list",
           "resolve_precision", "resolve_prompt_embeddings", "resolve_training_device", "seed_everything",
           "write_pipeline_root"]
