"""cmn-edge: interpretable, controllable image retrieval with Concept Metrics Networks on a CPU.

The runtime needs only onnxruntime, numpy, Pillow, hnswlib and click; it never imports torch.
"""

from .embedder import Embedder, Embeddings, ModelError
from .metadata import ModelMetadata, Preprocess
from .preprocess import ImageError

__all__ = [
    "Embedder",
    "Embeddings",
    "ImageError",
    "Index",
    "ModelError",
    "ModelMetadata",
    "Preprocess",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``Index`` is imported on first use: ``import cmn_edge`` stays light for embed-only use."""
    if name == "Index":
        from .index import Index

        return Index
    raise AttributeError(f"module 'cmn_edge' has no attribute {name!r}")
