"""Guest tag contents, kept sparsely per host page.

Tags are stored the way ``KVM_ARM_MTE_COPY_TAGS`` exposes them: one tag (0..15) per byte, one
byte per 16-byte granule, ``page_size / 16`` bytes per page. A page that is absent has all-zero
tags (KVM sanitises a page's tags when it is first mapped). Keys are host page indices, so tags
move with the host page: a migration that forgets to move them loses them, as it would on
hardware.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from hostd.model.types import MTE_GRANULE_BYTES

IndexArray = npt.NDArray[np.int64]


class TagContents:
    """A sorted array of host page indices and a matching ``(n, tags_per_page)`` array of tags.

    Every operation is vectorised over the pages it is given; cost is O(stored + given).
    """

    def __init__(self, page_size_bytes: int) -> None:
        self.tags_per_page = page_size_bytes // MTE_GRANULE_BYTES
        self._pages: IndexArray = np.empty(0, dtype=np.int64)
        self._tags = np.empty((0, self.tags_per_page), dtype=np.uint8)

    def __len__(self) -> int:
        return int(self._pages.size)

    @property
    def pages(self) -> IndexArray:
        """Host page indices that hold at least one non-zero tag (sorted, read-only view)."""
        view = self._pages.view()
        view.flags.writeable = False
        return view

    def read(self, pages: IndexArray) -> npt.NDArray[np.uint8]:
        """Tags of ``pages`` as a ``(len(pages), tags_per_page)`` array (zeros where none)."""
        out = np.zeros((pages.size, self.tags_per_page), dtype=np.uint8)
        if self._pages.size and pages.size:
            pos = np.searchsorted(self._pages, pages)
            pos_clip = np.minimum(pos, self._pages.size - 1)
            hit = self._pages[pos_clip] == pages
            out[hit] = self._tags[pos_clip[hit]]
        return out

    def locate(self, pages: IndexArray) -> tuple[IndexArray, npt.NDArray[np.bool_]]:
        """Where ``pages`` are stored: positions for :meth:`rows_at`, and which are stored at
        all (the others have all-zero tags). One search serves both questions."""
        if not self._pages.size or not pages.size:
            return np.zeros(pages.size, np.int64), np.zeros(pages.size, dtype=bool)
        pos = np.minimum(np.searchsorted(self._pages, pages), self._pages.size - 1)
        return pos, self._pages[pos] == pages

    def rows_at(self, positions: IndexArray | slice) -> npt.NDArray[np.uint8]:
        """The stored tag rows at ``positions`` (from :meth:`locate`, where it found a page; a
        slice reads a run of rows without a gather)."""
        return self._tags[positions]

    def write(self, pages: IndexArray, tags: npt.NDArray[np.uint8]) -> None:
        """Set the tags of ``pages`` (unique) to ``tags`` rows; all-zero rows are not stored."""
        self.discard(pages)
        keep = tags.any(axis=1)
        if not keep.any():
            return
        self._insert(pages[keep], tags[keep])

    def write_nonzero(self, pages: IndexArray, blocks: Sequence[npt.NDArray[np.uint8]]) -> None:
        """:meth:`write` for rows the caller knows are not all zero (a migration commit), given
        as blocks of rows that follow one another (one per chunk): skips the scan for all-zero
        rows, and the rows are copied once, into the store, not joined first."""
        self.discard(pages)
        if pages.size:
            self._insert(pages, *blocks)

    def discard(self, pages: IndexArray) -> None:
        """Forget the tags of ``pages`` (they read as zero afterwards)."""
        if not self._pages.size or not pages.size:
            return
        if pages.size > 4096:
            # A large batch (a VM destroyed, a range unplugged): one bitmap over the page
            # indices beats sorting both arrays as isin does.
            mask = np.zeros(max(int(pages.max()), int(self._pages[-1])) + 1, dtype=bool)
            mask[pages] = True
            drop = mask[self._pages]
        else:
            drop = np.isin(self._pages, pages)
        if drop.any():
            self._pages = self._pages[~drop]
            self._tags = self._tags[~drop]

    def discard_stored(self, drop: npt.NDArray[np.bool_]) -> None:
        """Forget the tags of the stored pages where ``drop`` (one entry per :attr:`pages`) is
        set: one pass over the store, whatever the number of pages."""
        if drop.any():
            self._pages = self._pages[~drop]
            self._tags = self._tags[~drop]

    def move(self, src: IndexArray, dst: IndexArray) -> None:
        """Tags of ``src[i]`` become the tags of ``dst[i]``; ``src`` pages read as zero after.

        ``dst`` pages must hold no tags (they are fresh destinations of a migration).
        """
        if not self._pages.size or not src.size:
            return
        pos = np.searchsorted(self._pages, src)
        pos_clip = np.minimum(pos, self._pages.size - 1)
        hit = self._pages[pos_clip] == src
        if not hit.any():
            return
        rows = self._tags[pos_clip[hit]]
        self.discard(src[hit])
        self._insert(dst[hit], rows)

    def _insert(self, pages: IndexArray, *rows: npt.NDArray[np.uint8]) -> None:
        """Store ``pages`` (not stored yet) with their rows: the ``rows`` blocks, joined."""
        pages = pages.astype(np.int64)
        if (not self._pages.size or int(pages[0]) > int(self._pages[-1])) and bool(
            (pages[1:] > pages[:-1]).all()
        ):
            # Appending in order (a VMM writing a guest's tags front to back, a migration
            # commit): no sort and no gather of the whole store.
            self._pages = np.concatenate([self._pages, pages])
            self._tags = np.concatenate([self._tags, *rows])
            return
        all_pages = np.concatenate([self._pages, pages])
        all_tags = np.concatenate([self._tags, *rows])
        order = np.argsort(all_pages, kind="stable")
        self._pages = all_pages[order]
        self._tags = all_tags[order]

    def state(self) -> tuple[IndexArray, npt.NDArray[np.uint8]]:
        """The stored pages and rows themselves (read-only views, not copies): every change
        replaces the arrays rather than writing into them, so a snapshot may keep these while
        the host goes on, and a copy would double the memory of a host with many tags."""
        pages, tags = self._pages.view(), self._tags.view()
        pages.flags.writeable = tags.flags.writeable = False
        return pages, tags

    def restore(self, pages: IndexArray, tags: npt.NDArray[np.uint8]) -> None:
        pages = pages.astype(np.int64, copy=False)
        tags = tags.astype(np.uint8, copy=False).reshape(-1, self.tags_per_page)
        if pages.size != tags.shape[0]:
            raise ValueError(f"{pages.size} tagged pages but {tags.shape[0]} rows of tags")
        if pages.size > 1 and not bool((pages[1:] > pages[:-1]).all()):
            # Saved states are sorted (see state()): sort only what was written otherwise.
            order = np.argsort(pages, kind="stable")
            pages, tags = pages[order], tags[order]
        self._pages, self._tags = pages, tags
