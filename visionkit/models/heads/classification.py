"""Classification heads on pooled backbone features: a linear classifier or a small MLP.

The input is what a timm-contract backbone gives with ``forward_head(forward_features(x), pre_logits=True)``: one
feature vector per image, ``(B, D)``. A map ``(B, D, H, W)`` is average-pooled first, so that plain convolutional
feature extractors can feed the head too.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ClassificationHead"]


class ClassificationHead(nn.Module):
    """Linear or MLP classifier on pooled features.

    ``hidden_dim=None`` gives ``dropout -> Linear(in_features, num_classes)`` (linear probe / fine-tuning head).
    With ``hidden_dim`` it is ``Linear(in_features, hidden_dim) -> GELU -> dropout -> Linear(hidden_dim,
    num_classes)``. Weights follow timm's classifier init (truncated normal, std 0.02; zero biases).

    Args:
        in_features: Feature dimension ``D`` of the input.
        num_classes: Number of output logits.
        hidden_dim: Hidden width of the MLP; ``None`` for a linear head.
        dropout: Dropout probability before the last linear layer.

    Example:
        >>> head = ClassificationHead(512, 10, hidden_dim=256)
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 10])
    """

    def __init__(self, in_features: int, num_classes: int, hidden_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features} and {num_classes}.")
        if hidden_dim is not None and hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1 or None, got {hidden_dim}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        if hidden_dim is None:
            self.hidden = nn.Identity()
        else:
            self.hidden = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.GELU())
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim or in_features, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal weights (std 0.02) and zero biases for every linear layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, features: Tensor) -> Tensor:
        """Logits for pooled features.

        Args:
            features: ``(B, in_features)`` float, or a map ``(B, in_features, H, W)`` that is average-pooled.

        Returns:
            Logits ``(B, num_classes)``, the dtype of ``features``.
        """
        if features.ndim == 4:
            features = features.mean(dim=(2, 3))
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"ClassificationHead expects features (B, {self.in_features}) or (B, {self.in_features}, H, W), "
                f"got {tuple(features.shape)}."
            )
        return self.fc(self.drop(self.hidden(features)))
