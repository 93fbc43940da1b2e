import torch

from pin.prompts import (
    IGNORE_INDEX,
    build_labels,
    end_text,
    eval_prompt,
    loss_free_prefix,
    masked_lm_loss,
    training_text,
)


def test_templates():
    assert eval_prompt("dog") == "In the image is a dog located at"
    assert eval_prompt("apple") == "In the image is an apple located at"
    assert loss_free_prefix("owl", True) == "In the image is an"
    assert loss_free_prefix("owl", False) == "In the image is an owl located at"


def test_training_texts_of_both_vlms_and_phases():
    # reference text_constructor: end text ".<|endofchunk|>" (OF) or "</s>" (BLIP-2), a space before it only while
    # the name is reconstructed; so BLIP-2 texts carry no period (spec b, "Text, loss, training")
    box = "[28,42,84,112]"
    of, blip2 = end_text("openflamingo", "<|endofchunk|>"), end_text("blip2", "</s>")
    assert training_text("dog", box, of, True) == "In the image is a dog located at [28,42,84,112] .<|endofchunk|>"
    assert training_text("dog", box, of, False) == "In the image is a dog located at [28,42,84,112].<|endofchunk|>"
    assert training_text("dog", box, blip2, True) == "In the image is a dog located at [28,42,84,112] </s>"
    assert training_text("dog", box, blip2, False) == "In the image is a dog located at [28,42,84,112]</s>"


def test_labels_on_hand_made_ids():
    IMG, BOS, PAD = 9, 1, 0
    ids = torch.tensor([[IMG, IMG, BOS, 20, 21, 22, 23, 2, PAD], [IMG, IMG, BOS, 30, 31, 2, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    targets = build_labels(ids, [4, 3], PAD, IMG, mask)
    n = IGNORE_INDEX
    # label of position t+1 at t; prefix of 4 (resp. 3) tokens, pads and image tokens ignored; end token kept
    assert targets.tolist() == [[n, n, n, 21, 22, 23, 2, n, n], [n, n, 30, 31, 2, n, n, n, n]]


def test_labels_without_attention_mask_use_pad_id():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    assert build_labels(ids, [1], 0, None).tolist() == [[6, 7, -100, -100, -100]]


def test_masked_lm_loss_is_mean_over_supervised_positions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0
    targets = torch.tensor([[2, -100, 1]])
    expected = (torch.nn.functional.cross_entropy(logits[0, [0]], torch.tensor([2])) + torch.log(torch.tensor(4.0))) / 2
    assert torch.allclose(masked_lm_loss(logits, targets), expected)


def test_loss_mask_on_the_real_tokenisation(tiny_blip2, codec):
    from pin.pipeline import training_batch

    vlm = tiny_blip2
    ids, mask, targets = training_batch(vlm, codec, ["circle", "square"], [[2, 3, 5, 7], [0, 0, 15, 15]], True)
    tok = vlm.tokenizer
    supervised = tok.decode([t for t in targets[0].tolist() if t != IGNORE_INDEX])
    assert supervised == " circle located at [28,42,84,112] </s>"
    ids, mask, targets = training_batch(vlm, codec, ["circle"], [[2, 3, 5, 7]], False)
    assert tok.decode([t for t in targets[0].tolist() if t != IGNORE_INDEX]) == " [28,42,84,112]</s>"
    assert tok.unk_token_id not in ids.flatten().tolist()
    # the sequence starts with the media placeholders then BOS
    q = vlm.num_image_tokens
    assert ids[0, :q].tolist() == [vlm.image_token_id] * q and ids[0, q].item() == tok.bos_token_id


def test_media_tokens_get_no_loss_even_after_the_prefix():
    IMG, n = 9, IGNORE_INDEX
    ids = torch.tensor([[1, IMG, IMG, 20, 21]])  # BOS, two media placeholders (not covered by the prefix), text
    assert build_labels(ids, [1], 0, IMG, torch.ones_like(ids)).tolist() == [[n, n, 20, 21, n]]
    assert build_labels(ids, [1], 0, None, torch.ones_like(ids)).tolist() == [[IMG, IMG, 20, 21, n]]
