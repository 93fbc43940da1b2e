import pytest


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
