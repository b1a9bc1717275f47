"""Real processors of more families on their tiny models (filled in by issue 10's processor work)."""
from tiny_processors import ProcessorSpec

SPECS: dict[str, ProcessorSpec] = {}
