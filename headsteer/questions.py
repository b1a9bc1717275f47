"""What a question may be: text without an image placeholder (the prompt template places the image).
Kept apart from ``headsteer.data`` so that the adapters check questions without importing ``datasets``."""
from __future__ import annotations

from .errors import HeadsteerError

# placeholders of common processors; the adapter adds the loaded processor's own (Adapter.image_tokens)
IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>", "<start_of_image>", "<|vision_start|>", "<IMG_CONTEXT>")


def check_question(question, where: str = "", placeholders=()) -> str:
    """``question`` if it is non-empty text holding none of ``IMAGE_PLACEHOLDERS`` nor ``placeholders``."""
    if not isinstance(question, str) or not question.strip():
        raise HeadsteerError(f"{where}question must be non-empty text; got {str(question)[:60]!r}")
    tag = next((t for t in (*IMAGE_PLACEHOLDERS, *placeholders) if t in question), None)
    if tag is not None:
        raise HeadsteerError(f"{where}question {question[:60]!r} contains the image placeholder {tag}: remove it, the "
                             "prompt template places the image")
    return question
