"""A minimal progress bar on stderr: tqdm when installed, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``update(n, **postfix)`` / ``close()``; silent when ``enabled`` is False."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.count, self._last_print = 0, 0.0
        self._bar: Any = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                         dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        if not self.enabled:
            return
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in postfix.items())
        if self._bar is not None:
            if text:
                self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_print >= 1.0 or self.count >= self.total:
            self._last_print = now
            print(f"{self.desc}: {self.count}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
