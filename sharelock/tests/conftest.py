import importlib
import os
import sys

import pytest
import torch

# pytest's importlib mode names this file `sharelock.tests.conftest` (path relative to the repo root) and registers the
# folder `<repo>/sharelock` as a namespace package `sharelock`, shadowing the installed package: put the real one back.
if getattr(sys.modules.get("sharelock"), "__file__", None) is None:
    del sys.modules["sharelock"]
    importlib.import_module("sharelock")

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_text():
    """A word tokenizer and tiny random Llama over a small caption vocabulary."""
    from sharelock.tiny import build_tiny_llama, build_word_tokenizer

    captions = [
        "a red circle",
        "a small blue square on the left",
        "a green triangle",
        "two yellow circles and a big red square near the top",
        "A photo of a cat",
    ]
    tokenizer = build_word_tokenizer(captions)
    return tokenizer, build_tiny_llama(len(tokenizer), hidden_size=32), captions
