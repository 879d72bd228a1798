"""cmn-edge: interpretable, controllable image retrieval with Concept Metrics Networks on a CPU.

The runtime needs only onnxruntime, numpy, Pillow, hnswlib and click; it never imports torch.
"""

from .embedder import Embedder, Embeddings, ModelError
from .metadata import ModelMetadata, Preprocess
from .preprocess import ImageError

__all__ = ["Embedder", "Embeddings", "ImageError", "ModelError", "ModelMetadata", "Preprocess"]
__version__ = "0.1.0"
