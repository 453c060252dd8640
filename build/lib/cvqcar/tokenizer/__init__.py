"""Image tokenizers: CVQ and the patch-wise baseline; training, export."""
