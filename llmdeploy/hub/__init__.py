"""Upload to the Hugging Face Hub in one commit, with a generated model card.

- :func:`push_to_hub_gguf`: export GGUF files and upload them.
- :func:`push_to_hub_merged`: save a merged model (or a LoRA adapter) and upload it.
- :func:`push_folder`: upload an existing folder or files.
- :func:`build_model_card`: the card those functions add when there is no README.md.
"""

from .card import build_model_card
from .upload import push_folder, push_to_hub_gguf, push_to_hub_merged

__all__ = ["build_model_card", "push_folder", "push_to_hub_gguf", "push_to_hub_merged"]
