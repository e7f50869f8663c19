"""Literal visibility tables for sliding and full attention, with and without a ring cache."""

import torch

from gemmarun.masks import visible


def _table(mask):
    return ["".join("x" if v else "." for v in row) for row in mask.tolist()]


def test_full_attention_is_causal():
    pos = torch.arange(4)
    assert _table(visible(pos, pos, None)) == ["x...", "xx..", "xxx.", "xxxx"]


def test_sliding_window_sees_exactly_window_keys_including_itself():
    pos = torch.arange(6)
    assert _table(visible(pos, pos, 3)) == [
        "x.....",
        "xx....",
        "xxx...",
        ".xxx..",
        "..xxx.",
        "...xxx",
    ]


def test_ring_slots_with_empty_and_rotated_positions():
    # ring of 4 slots after positions 0..5 were written: slot = pos % 4 -> [4, 5, 2, 3]
    keys = torch.tensor([4, 5, 2, 3])
    q = torch.tensor([5])
    assert _table(visible(q, keys, 4)) == ["xxxx"]  # 2..5: exactly the 4 latest
    assert _table(visible(q, keys, 3)) == ["xx.x"]  # a stale slot (position 2) is out of a window of 3
    empty = torch.tensor([0, -1, -1, -1])
    assert _table(visible(torch.tensor([0]), empty, 4)) == ["x..."]


def test_vision_blocks_from_token_types():
    from gemmarun.masks import vision_blocks

    types = torch.tensor([0, 1, 1, 0, 0, 2, 2, 2, 3, 3, 1])
    assert vision_blocks(types).tolist() == [-1, 0, 0, -1, -1, 1, 1, 1, -1, -1, 2]


def test_image_tokens_see_each_other_within_the_window_only():
    from gemmarun.masks import vision_blocks

    # text, image x4, text: positions 1..4 are one block
    blocks = vision_blocks(torch.tensor([0, 1, 1, 1, 1, 0]))
    pos = torch.arange(6)
    assert _table(visible(pos, pos, 3, blocks)) == [
        "x.....",
        "xxxxx.",  # the first image token sees the whole image ahead of it ...
        "xxxxx.",
        ".xxxx.",  # ... but never a key at or before q - window
        "..xxx.",
        "...xxx",
    ]
    # full layers pass no blocks and stay causal
    assert _table(visible(pos, pos, None)) == [("x" * (i + 1)).ljust(6, ".") for i in range(6)]
