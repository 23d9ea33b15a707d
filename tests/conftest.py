"""The whole suite runs offline, as CI does: the Hugging Face hub is never called (adapters by Hugging Face id
come from a cache the tests fill). Set before `huggingface_hub` is imported, and inherited by Ray's workers."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
