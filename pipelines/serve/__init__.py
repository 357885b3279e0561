"""Serving: captions, answers and text-to-image retrieval for user images from a model URI.

`load_predictor(cfg, uri)` then `caption`, `answer`, `retrieve` (see `pipelines.serve.predict`).
"""

from pipelines.serve.predict import Predictor, answer, caption, image_files, load_predictor, retrieve

__all__ = ["Predictor", "answer", "caption", "image_files", "load_predictor", "retrieve"]
