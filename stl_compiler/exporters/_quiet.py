"""Keep torch's and the ONNX exporter's internal chatter out of an export's output.

Only messages that say nothing to the user of ``stl_compiler`` are muted (each listed here with
why); every other warning, ours and the model's, still shows.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: (warning category, message regex): torch's own deprecation of its pytree internals, raised
#: from inside torch.export / torch.onnx while they pickle tree specs.
_NOISY_WARNINGS = (
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)"),
)

#: Loggers muted below ERROR: the ONNX exporter lists the torchvision ops it cannot register
#: ("torchvision is not installed. Skipping torchvision::nms") on every export.
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


@contextlib.contextmanager
def quiet_torch_internals() -> Iterator[None]:
    """Mute the known-noisy internal warnings and log lines for the duration of the block."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for category, message in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.setLevel(max(logger.level, logging.ERROR))
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
