"""Real processors of the last families on their tiny models (DeepSeek-OCR 2, Nemotron 3 Nano Omni, Unlimited-OCR)."""
from tiny_processors import ProcessorSpec

SPECS: dict[str, ProcessorSpec] = {}
