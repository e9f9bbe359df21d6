"""The cache keyword: past_key_values= before transformers 5.24, cache= from it."""

import inspect

import transformers
from packaging.version import Version

from a2ats.compat import cache_keyword, cache_kwargs

from tiny_models import tiny_model


def test_cache_keyword_is_the_one_this_transformers_takes():
    model = tiny_model("llama")
    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert cache_keyword(model) == expected
    assert expected in inspect.signature(model.forward).parameters
    marker = object()
    assert cache_kwargs(model, marker) == {expected: marker}


def test_cache_keyword_falls_back_where_forward_cannot_be_read():
    class Opaque:
        forward = staticmethod(print)  # a builtin: inspect.signature raises ValueError

    assert cache_keyword(Opaque()) == "past_key_values"
