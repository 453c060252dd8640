"""Input pipelines: images, text-image pairs, text tokenizers. No model code."""
