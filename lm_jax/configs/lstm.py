"""Configs of the recurrent language models (the Transformer's predecessors) and their truncated
back-propagation-through-time training, with Zaremba et al. (2014)'s PTB presets."""

from __future__ import annotations

import dataclasses

from lm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    """A word-level LSTM LM: embedding -> `num_layers` LSTM layers -> softmax (untied)."""

    vocab_size: int = 10_000
    hidden: int = 200  # embedding and every LSTM layer
    num_layers: int = 2
    dropout: float = 0.0  # on the embedding output and after every LSTM layer (non-recurrent)
    init_scale: float = 0.1  # every parameter ~ U(-init_scale, init_scale), biases included

    def __post_init__(self):
        if self.vocab_size < 2 or self.hidden < 1 or self.num_layers < 1:
            raise ConfigError(
                f"LSTMConfig needs vocab_size >= 2, hidden >= 1 and num_layers >= 1, got "
                f"{self.vocab_size}, {self.hidden}, {self.num_layers}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class BPTTConfig:
    """Truncated BPTT over one token stream cut into `batch_size` contiguous columns; the state
    carries from one window to the next and resets at each epoch. Plain SGD on the loss summed
    over the window's time steps and averaged over the batch, gradients clipped to `grad_clip`
    global norm, the learning rate multiplied by `lr_decay` per epoch after `max_epoch` epochs
    (Zaremba et al.'s recipe)."""

    batch_size: int = 20
    num_steps: int = 20  # window length (time steps back-propagated through)
    epochs: int = 13
    learning_rate: float = 1.0
    lr_decay: float = 0.5
    max_epoch: int = 4  # epochs at the full learning rate
    grad_clip: float = 5.0

    def __post_init__(self):
        if min(self.batch_size, self.num_steps, self.epochs) < 1:
            raise ConfigError("batch_size, num_steps and epochs must all be >= 1")
        if self.learning_rate <= 0 or not 0 < self.lr_decay <= 1:
            raise ConfigError("learning_rate must be > 0 and lr_decay in (0, 1]")

    def learning_rate_at(self, epoch: int) -> float:
        return self.learning_rate * self.lr_decay ** max(epoch + 1 - self.max_epoch, 0)


# Zaremba, Sutskever & Vinyals (2014), "Recurrent neural network regularization", PTB test
# perplexity: small 114.5 (no dropout), medium 82.7 (dropout 0.5).
ZAREMBA = {
    "small": (LSTMConfig(hidden=200, dropout=0.0, init_scale=0.1), BPTTConfig()),
    "medium": (
        LSTMConfig(hidden=650, dropout=0.5, init_scale=0.05),
        BPTTConfig(num_steps=35, epochs=39, lr_decay=0.8, max_epoch=6),
    ),
}
