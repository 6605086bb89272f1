"""Small models for the 8x8 handwritten-digits demo (inputs ``(N, 1, 8, 8)`` in [0, 1])."""

from __future__ import annotations

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """Conv net for 8x8 digits: two conv blocks and a hidden layer.

    The default size is the demo's teacher (~150k parameters); ``width=16, hidden=64,
    dropout=0`` is its student (~38k parameters).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 1, 8, 8)`` -> ``(N, num_classes)`` logits."""
        return self.classifier(self.features(x))
