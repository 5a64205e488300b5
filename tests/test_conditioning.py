"""Condition dropout for classifier-free guidance: dropped rows become exactly the null condition."""

from __future__ import annotations

import pytest
import torch

from mdm.models.conditioning import Conditioning, drop


def test_labels_become_the_null_class() -> None:
    cond = Conditioning(labels=torch.tensor([1, 2, 3, 0]), micro={"scale": torch.tensor([8.0, 8, 4, 4])})
    out = drop(cond, torch.tensor([True, False, True, False]), Conditioning(labels=torch.tensor([5])))
    assert out.labels.tolist() == [5, 2, 5, 0]
    assert torch.equal(out.micro["scale"], cond.micro["scale"])
    assert drop(cond, torch.zeros(4, dtype=torch.bool), Conditioning(labels=torch.tensor([5]))) is cond


def test_text_rows_become_the_empty_caption_padded_to_the_longer() -> None:
    text = torch.randn(3, 2, 4)
    cond = Conditioning(text=text, text_mask=torch.tensor([[1, 1], [1, 0], [1, 1]]))
    null = Conditioning(text=torch.full((1, 3, 4), 7.0), text_mask=torch.tensor([[1, 1, 0]]))
    out = drop(cond, torch.tensor([False, True, False]), null)
    assert out.text.shape == (3, 3, 4)
    assert torch.equal(out.text[1], null.text[0]) and out.text_mask[1].tolist() == [1, 1, 0]
    assert torch.equal(out.text[0, :2], text[0]) and out.text_mask[0].tolist() == [1, 1, 0]
    assert torch.equal(out.text[2, 2], torch.zeros(4))


def test_null_must_be_one_row() -> None:
    cond = Conditioning(labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="single row"):
        drop(cond, torch.tensor([True, False]), Conditioning(labels=torch.tensor([5, 5])))
