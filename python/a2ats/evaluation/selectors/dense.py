"""Dense attention: every cached row, the reference every budget is compared with."""

from .base import Selector


class Dense(Selector):
    name = "dense"
    reads_all = True
