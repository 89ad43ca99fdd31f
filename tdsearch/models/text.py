"""A text classifier over token ids: embedding + LSTM + linear, the shape of the MARS paper's
sentiment models (Section 4.3) and of the ADMM-TT paper's LSTM experiments (Section 5.3). Built
for the ``wordnet`` dataset (its vocabulary of 8,002 rows); most of its parameters sit in the
embedding."""

from __future__ import annotations

import torch
from torch import nn

from tdsearch.data._wordnet import PAD, VOCABULARY_ROWS


class TextLSTM(nn.Module):
    """Embedding (vocabulary x 256) - LSTM (128) - linear (classes); input (B, tokens) ids,
    padded at the front, so the last step's state reads the whole text."""

    def __init__(self, num_classes: int, vocabulary: int = VOCABULARY_ROWS, dim: int = 256):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, dim, padding_idx=PAD)
        self.lstm = nn.LSTM(dim, 128, batch_first=True)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(tokens))
        return self.fc(states[:, -1])
