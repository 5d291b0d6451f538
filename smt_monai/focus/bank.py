"""The score bank: Eq. 2's temporal ensemble ``S`` of focusing scores, kept per region across epochs."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch


class ScoreBank:
    """Temporal ensemble ``S(e) = eps * S(e-1) + (1 - eps) * g(e)`` (Eq. 2) per region key.

    Keys are region keys (``smt_monai.data.geometry.region_key``: slide id plus level-0 box), so a score
    follows its region whatever batch or epoch it appears in. Only focusable regions are scored: the layer-1
    region of every slide and the layer-2 regions chosen by top-K (the weak-supervision extra region is never
    focused, so it needs no score).

    First observation: ``S = (1 - eps) * g``, i.e. Eq. 2 with ``S(0) = 0``. Because every patch of a region
    has the same number of observations and Eq. 3 is invariant to a common scale, the normalised target
    ``S~`` then equals that of the bias-corrected average ``S / (1 - eps**n)``: early, noisy gradients are
    averaged, not frozen in with weight ``eps`` as ``S = g`` would do.

    Memory: scores live in one CPU matrix of ``capacity x grid**2`` values of ``dtype`` (capacity doubles as
    keys arrive, capped by ``max_entries``), plus about 200 bytes of Python per key (key string and
    ordered-dict entry). Per epoch a slide touches ``1 + K`` keys; over training its layer-2 keys can
    accumulate up to ``grid**2`` as its focus moves. For a cohort of 10,000 slides, float32, grid 8
    (256 bytes per key):

    * steady focus, K = 8: 10,000 x (1 + 8) x 64 x 4 B = 23 MB (+ about 18 MB of key overhead);
    * every layer-2 region visited once: 10,000 x (1 + 64) x 64 x 4 B = 166 MB (+ about 130 MB);
    * grid 16, same worst case: 10,000 x (1 + 256) x 256 x 4 B = 2.6 GB: set ``max_entries`` (e.g. 200,000
      keys = 205 MB) and/or ``dtype=torch.bfloat16`` (half the bytes, float32's range).

    ``max_entries`` evicts the least recently used key; an evicted region restarts from ``S(0) = 0``.
    float16 storage is allowed but can flush small gradients (below about 6e-8) to zero; bfloat16 cannot.

    Args:
        eps: ensemble momentum ``epsilon`` of Eq. 2, in ``[0, 1)`` (default 0.9).
        max_entries: optional cap on the number of keys (LRU eviction).
        dtype: storage dtype of the scores (computation is float32).

    Raises:
        ValueError: if ``eps`` is outside ``[0, 1)`` or ``max_entries`` is not positive.
    """

    def __init__(self, eps: float = 0.9, max_entries: int | None = None, dtype: torch.dtype = torch.float32):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.eps = eps
        self.max_entries = max_entries
        self.dtype = dtype
        self._rows: OrderedDict[str, int] = OrderedDict()
        self._scores = torch.zeros(0, 0, dtype=dtype)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def update(self, keys: Sequence[str], g: torch.Tensor) -> torch.Tensor:
        """Fold one observation of Eq. 2's instantaneous score into the ensemble of each key.

        Args:
            keys: one region key per row of ``g``; a key repeated in the batch is updated once per row, in
                order.
            g: ``(len(keys), grid**2)`` instantaneous scores (``focusing_score``).

        Returns:
            ``(len(keys), grid**2)`` float32 ensembles ``S`` after the update (as stored), on ``g``'s device.

        Raises:
            ValueError: if ``keys`` and ``g`` disagree in length, or ``g``'s width differs from the bank's.
        """
        if g.dim() != 2 or len(keys) != g.shape[0]:
            raise ValueError(f"expected g of shape ({len(keys)}, N), got {tuple(g.shape)}")
        g_cpu = g.detach().to("cpu", torch.float32)
        out = torch.empty_like(g_cpu)
        for n, key in enumerate(keys):
            row = self._rows.get(key)
            if row is None:
                new = (1.0 - self.eps) * g_cpu[n]
                row = self._allocate(key, g_cpu.shape[1])
            else:
                self._rows.move_to_end(key)
                new = self.eps * self._scores[row].float() + (1.0 - self.eps) * g_cpu[n]
            self._scores[row] = new.to(self.dtype)
            out[n] = self._scores[row].float()
        return out.to(g.device)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """The current ensembles ``S`` of ``keys`` as a ``(len(keys), grid**2)`` float32 CPU tensor.

        Raises:
            KeyError: for a key never updated (or evicted).
        """
        rows = []
        for key in keys:
            rows.append(self._rows[key])
            self._rows.move_to_end(key)
        return self._scores[rows].float()

    def state_dict(self) -> dict[str, Any]:
        """Keys (least recently used first) and their scores, for checkpoints."""
        keys = list(self._rows)
        return {"keys": keys, "scores": self._scores[[self._rows[k] for k in keys]].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the bank's content with ``state`` (from ``state_dict``), keeping the most recent keys
        when ``max_entries`` is smaller than the number stored."""
        keys = list(state["keys"])
        scores = torch.as_tensor(state["scores"]).to(self.dtype)
        if scores.dim() != 2 or scores.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys but scores of shape {tuple(scores.shape)}")
        if self.max_entries is not None and len(keys) > self.max_entries:
            keys, scores = keys[-self.max_entries :], scores[-self.max_entries :]
        self._rows = OrderedDict((k, i) for i, k in enumerate(keys))
        self._scores = scores.clone()

    def merge_state_dict(self, state: dict[str, Any]) -> None:
        """Add the entries of another bank's ``state_dict`` (its score wins for a key both hold).

        Used to combine the banks of ``torchrun`` processes, which score disjoint or overlapping slides.
        """
        scores = torch.as_tensor(state["scores"]).to(self.dtype)
        for key, row_scores in zip(state["keys"], scores, strict=True):
            row = self._rows[key] if key in self._rows else self._allocate(key, row_scores.shape[0])
            self._scores[row] = row_scores
            self._rows.move_to_end(key)

    def _allocate(self, key: str, width: int) -> int:
        """Give ``key`` a row of the score matrix, evicting the least recently used key when full."""
        if self._scores.shape[0] == 0:
            self._scores = torch.zeros(0, width, dtype=self.dtype)
        if width != self._scores.shape[1]:
            raise ValueError(f"the bank holds {self._scores.shape[1]} scores per region, got {width}")
        if self.max_entries is not None and len(self._rows) >= self.max_entries:
            _, row = self._rows.popitem(last=False)
        else:
            row = len(self._rows)
            if row == self._scores.shape[0]:
                capacity = max(16, 2 * row)
                if self.max_entries is not None:
                    capacity = min(capacity, self.max_entries)
                grown = torch.zeros(capacity, width, dtype=self.dtype)
                grown[:row] = self._scores
                self._scores = grown
        self._rows[key] = row
        return row
