"""Data: the webdataset training stream (raw images or precomputed latents), shard preparation, the demo set."""

from data.config import DataConfig
from data.stream import Loader, build_loader

__all__ = ["DataConfig", "Loader", "build_loader"]
