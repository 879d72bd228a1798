"""Calibration: the search depth ``ef`` and the mask depth exponents (excluding and
renormalised masks apart), tuned to a recall target.

Run at ``index build``, by ``index optimize``, and again by a checkpoint whenever the gallery
has grown by :data:`RETUNE_GROWTH` since the last tuning (a graph that doubled needs a
deeper walk for the same recall); in between, a checkpoint checks the tuned depths
against the target at every :data:`CHECK_GROWTH` of growth and re-tunes when they miss it.
A checkpoint tunes (and checks) on the items that arrived since the last one, before they
enter the graph: queries the graph has never seen, which is what a user's query is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np

#: Re-tune ef and the mask exponent when the gallery has grown by this factor.
RETUNE_GROWTH = 2.0
#: Between tunings, check the depths against the target when the gallery has grown by
#: this factor since the last look, and re-tune if they miss it.
CHECK_GROWTH = 1.25
#: Re-fit the --graph-dims projection (a full graph rebuild) at this growth factor.
REFIT_GROWTH = 4.0


class CalibrateMixin:
    """Needs ``search_ids``, ``ids``, ``embedding``, ``_vectors`` and the search parameters."""

    def recall(self, queries: np.ndarray, k: int = 10, **controls) -> float:
        """Mean recall@k of the graph search against brute force, under ``controls``."""
        queries = self._vectors(queries)
        hits = 0
        total = 0
        for q in queries:
            approx, _ = self.search_ids(q, k, **controls)
            exact, _ = self.search_ids(q, k, exact=True, **controls)
            hits += len(set(approx.tolist()) & set(exact.tolist()))
            total += len(exact)
        return hits / max(total, 1)

    def calibrate(
        self,
        target: float = 0.98,
        k: int = 10,
        queries: np.ndarray | None = None,
        sample: int = 100,
        seed: int = 0,
        mask_fractions: Sequence[float] = (0.1, 0.5),
        exclude_own: Sequence[int] | None = None,
    ) -> dict:
        """Raise ef (plain) and the mask depth exponent until recall@k reaches ``target``
        with a margin of two standard errors of the sample's mean recall.

        Give ``queries`` that are NOT in the graph (e.g. images held back from the build):
        a gallery item used as its own query (left out of the results) still sits in the
        graph as a stepping stone right next to the answer, which flatters recall. Without
        ``queries`` that is what is used. ``exclude_own``: the item id each query is (left
        out of its own results), for queries taken from the index's tail. Masks drop a
        random fraction of the parts (concepts, or a DGML's groups), scored both as masked
        inner product and renormalised. Galleries small enough for brute force need none of
        this.

        What is tuned is the walk's depth: the projected scan (:mod:`.scan`) that a deep
        query may take instead ranks every row in the graph's space, so it finds at least
        what a walk of the same depth does; it is off while tuning.
        """
        with self._walks_only():
            return self._calibrate_walk(
                target, k, queries, sample, seed, mask_fractions, exclude_own
            )

    @contextlib.contextmanager
    def _walks_only(self):
        """The projected scan off while a depth is measured: it is the walk's depth that is
        tuned and checked."""
        walk_only, self._walk_only = self._walk_only, True
        try:
            yield
        finally:
            self._walk_only = walk_only

    def meets_target(
        self,
        queries: np.ndarray,
        exclude_own: Sequence[int] | None = None,
        target: float = 0.98,
        k: int = 10,
        seed: int = 0,
        mask_fractions: Sequence[float] = (0.1, 0.5),
    ) -> dict:
        """Whether today's depths still reach ``target`` on ``queries`` the graph has not
        seen (each mask's mean recall@k), without tuning anything.

        A checkpoint takes this look between tunings: the same gallery grown denser needs a
        deeper walk (tuned at 63k items, plain recall@10 fell from 0.996 to 0.983 at 100k),
        and waiting for the next doubling let it sit below the target for most of the way.
        The mean, not the lower bound that tuning must clear: a depth tuned just to clear it
        sits about two standard errors above the target, and a check that asked the same
        failed every other time on such a depth (a re-tuning at almost every check).
        """
        with self._walks_only():
            trial = _Trial(self, k, queries, 0, seed, mask_fractions, exclude_own)
            if trial.trivial:
                return {"ok": True, "recall": 1.0, "masked_recall": {}, "queries": 0}
            plain, _ = trial.measure(*trial.plain)
            masked = {name: trial.measure(c, t) for name, c, t in trial.masks(None)}
        return {
            "ok": plain >= target and all(mean >= target for mean, _ in masked.values()),
            "recall": plain,
            "masked_recall": {name: mean for name, (mean, _) in masked.items()},
            "queries": len(trial.queries),
            "target": target,
        }

    def _calibrate_walk(self, target, k, queries, sample, seed, mask_fractions, exclude_own):
        trial = _Trial(self, k, queries, sample, seed, mask_fractions, exclude_own)
        if trial.trivial:
            return {
                "ef": self.ef,
                "mask_ef_power": self.mask_ef_power,
                "renorm_ef_power": self.renorm_ef_power,
                "recall": 1.0,
                "masked_recall": {},
                "queries": 0,
            }
        plain, plain_low = trial.measure(*trial.plain)
        while plain_low < target and self.ef < self.max_ef:
            self.ef = min(self.max_ef, math.ceil(self.ef * 1.25))
            plain, plain_low = trial.measure(*trial.plain)

        def tune(attribute: str, sets: list) -> dict:
            """The smallest exponent (quarter steps) at which every mask of ``sets`` meets
            the target: it rises in whole steps to the first that does, then comes back
            down while it still does (deeper than needed costs time on every query)."""

            def masked_at(power: float) -> tuple[dict, bool]:
                setattr(self, attribute, power)
                found = {name: trial.measure(c, t) for name, c, t in sets}
                return found, all(low >= target for _, low in found.values())

            power, (masked, ok) = 0.0, masked_at(0.0)
            while not ok and power < 8:
                power += 1.0
                masked, ok = masked_at(power)
            if ok:
                for lower in (power - 0.25, power - 0.5, power - 0.75):
                    if lower < 0:
                        break
                    found, still = masked_at(lower)
                    if not still:
                        break
                    power, masked = lower, found
            setattr(self, attribute, power)
            return masked

        # apart: renormalised masks need a deeper walk than excluding ones (the walk ranks
        # by masked inner product, they by masked cosine), and one exponent for both made
        # every excluding query pay for that
        masked = tune("mask_ef_power", trial.masks(False))
        masked.update(tune("renorm_ef_power", trial.masks(True)))
        self._tuned(len(trial.ids))
        return {
            "ef": self.ef,
            "mask_ef_power": self.mask_ef_power,
            "renorm_ef_power": self.renorm_ef_power,
            "recall": plain,
            "masked_recall": {name: mean for name, (mean, _) in masked.items()},
            "queries": len(trial.queries),
            "target": target,
        }


class _Trial:
    """The queries a tuning or a check measures, each with its random masks and the exact
    answers (which do not depend on the depth: computed once)."""

    def __init__(self, index, k, queries, sample, seed, mask_fractions, exclude_own) -> None:
        rng = np.random.default_rng(seed)
        self.index, self.k = index, k
        self.ids = np.asarray(index.ids)
        self.trivial = len(self.ids) <= max(index.exact_below, k + 1)
        if self.trivial:
            return
        if queries is not None:
            self.queries = index._vectors(queries)
            self.own = (
                [set() for _ in self.queries]
                if exclude_own is None
                else [{int(i)} for i in exclude_own]
            )
        else:
            chosen = rng.choice(self.ids, size=min(sample, len(self.ids)), replace=False)
            self.queries = np.stack([index.embedding(int(i)) for i in chosen])
            self.own = [{int(i)} for i in chosen]
        plain = [{} for _ in self.queries]
        self.plain = (plain, self.exact(plain))
        self._masks: list[tuple[bool, str, list, list]] = []
        count = index.parts.count  # masks drop whole parts: concepts, or a DGML's groups
        for fraction in mask_fractions:
            n_drop = max(1, round(fraction * count))
            drops = [rng.choice(count, n_drop, replace=False) for _ in self.queries]
            for renormalize in (False, True):
                name = f"{fraction}{' renormalized' if renormalize else ''}"
                controls = [{"exclude": d, "renormalize": renormalize} for d in drops]
                self._masks.append((renormalize, name, controls, self.exact(controls)))

    def masks(self, renormalize: bool | None) -> list[tuple[str, list, list]]:
        """(name, controls, exact answers) of the renormalised masks, the excluding ones,
        or (None) all."""
        return [(n, c, t) for r, n, c, t in self._masks if renormalize in (None, r)]

    def exact(self, controls: list[dict]) -> list[set]:
        found = self.index.exact_ids_many(self.queries, self.k, controls, self.own)
        return [set(ids.tolist()) for ids in found]

    def measure(self, controls: list[dict], truth: list[set]) -> tuple[float, float]:
        """Mean recall, less two standard errors of it (from the per-query spread: the k
        results of one query are not independent draws)."""
        per_query = np.array(
            [
                len(
                    truth[j]
                    & set(
                        self.index.search_ids(q, self.k, exclude_ids=self.own[j], **c)[0].tolist()
                    )
                )
                / max(len(truth[j]), 1)
                for j, (q, c) in enumerate(zip(self.queries, controls))
            ]
        )
        spread = float(per_query.std(ddof=1)) if len(per_query) > 1 else 0.0
        mean = float(per_query.mean())
        return mean, mean - 2.0 * spread / math.sqrt(len(per_query))


__all__ = ["CHECK_GROWTH", "REFIT_GROWTH", "RETUNE_GROWTH", "CalibrateMixin"]
