"""StreamingLLM (Xiao et al. 2024): the first ``sink`` and last ``window`` tokens only."""

from .base import Selector


class StreamingLLM(Selector):
    name = "streaming"
    scores_tokens = False
