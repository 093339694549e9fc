"""A DataLoader that yields (dataset indices, batch), for per-sample gradient memory."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset, IterableDataset, default_collate


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class _IndexedCollate:
    """Collate the items as the wrapped collate_fn would; the indices into a tensor."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, batch):
        return torch.tensor([i for i, _ in batch]), self.collate_fn([item for _, item in batch])


class DataLoader(TorchDataLoader):
    """torch.utils.data.DataLoader over a map-style dataset, yielding (indices, batch).

        for indices, (x, y) in actnn_aq.DataLoader(dataset, batch_size=64, shuffle=True):
            model.set_sample_indices(indices)
            loss = criterion(model(x), y)
    """

    def __init__(self, dataset: Dataset, *args, collate_fn=None, **kwargs):
        if isinstance(dataset, IterableDataset):
            raise ValueError("actnn_aq.DataLoader needs a map-style dataset (samples have indices)")
        super().__init__(_Indexed(dataset), *args, collate_fn=_IndexedCollate(collate_fn or default_collate),
                         **kwargs)
